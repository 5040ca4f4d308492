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
