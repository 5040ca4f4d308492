"""Handing freed memory back: tensors freed in the middle of glibc's heap leave the resident set."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PATTERN = """
import sys, torch
from modelpress import system
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "unmapped":
    assert system.unmap_large_blocks()
big = torch.empty(30 << 20, dtype=torch.uint8).fill_(1)
del big  # with glibc's dynamic threshold, the 2 MiB blocks below now come from the heap
blocks = [torch.empty(2 << 20, dtype=torch.uint8).fill_(1) for _ in range(120)]
keep = blocks.pop()  # pins the top of the heap
before = rss()
del blocks
if sys.argv[1] == "trimmed":
    assert system.release_freed_memory()
print(before - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_unmapped_large_blocks_leave_the_resident_set_when_freed():
    """What the ``modelpress`` command sets at start: 119 freed 2 MiB tensors leave the resident set at once,
    where glibc's default (its threshold raised by one freed 30 MiB block) keeps them."""
    def returned(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert returned("unmapped") > 200 << 20
    assert returned("default") < 50 << 20  # the control: without it, they stay


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_tensors_leave_the_resident_set_when_trimmed():
    """``release_freed_memory`` (glibc's ``malloc_trim``) hands back heap blocks freed under glibc's default
    threshold. In a fresh process: the ``modelpress`` command (run in-process by other tests) fixes the threshold."""
    out = subprocess.run([sys.executable, "-c", _PATTERN, "trimmed"], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) > 200 << 20


def test_the_command_sets_the_threshold_unless_told_not_to(monkeypatch):
    from modelpress import cli, system

    calls = []
    monkeypatch.setattr(system, "unmap_large_blocks", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        cli.main(["recipes", "--no-such-flag"])
    assert calls == [1]
    monkeypatch.setenv("MODELPRESS_MALLOC", "default")
    with pytest.raises(SystemExit):
        cli.main(["recipes", "--no-such-flag"])
    assert calls == [1]


_FREEZE = """
import gc, sys, weakref, torch
from modelpress import system
class Node:  # a model's module graph: objects in a reference cycle, holding weights
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other, a.weight = b, a, torch.ones(1 << 20)
    return weakref.ref(a.weight)
early = cycle()  # garbage before the freeze: collected by it, not frozen
assert system.freeze_loaded_code(["json"]) and not system.freeze_loaded_code(["json"])
assert "json" in sys.modules and gc.get_freeze_count() > 0
late = cycle()  # a model loaded after it: still freed by the memory steps' collection
system.release_freed_memory()
print(early() is None, late() is None)
"""


def test_freezing_the_imports_still_frees_the_cycles_of_later_models():
    """``freeze_loaded_code`` (run once, before a model loads) keeps the imported libraries out of later full
    collections, while a model's reference cycles created after it are still freed by ``release_freed_memory``,
    and garbage that existed before it is collected rather than frozen. In a fresh process: pytest's own
    process froze its imports at collection."""
    out = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
