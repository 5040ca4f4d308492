"""Handing freed memory back: tensors freed in the middle of glibc's heap leave the resident set."""

from __future__ import annotations

import platform

import pytest
import torch

from modelpress.system import release_freed_memory


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_tensors_leave_the_resident_set():
    release_freed_memory()
    big = torch.empty(30 << 20, dtype=torch.uint8).fill_(1)  # under the 32 MiB cap of the threshold
    del big  # an mmapped block freed: glibc's mmap threshold rises to its size
    blocks = [torch.empty(16 << 20, dtype=torch.uint8).fill_(1) for _ in range(24)]  # now from the heap
    keep = blocks.pop()  # the last one pins the top of the heap: the rest cannot shrink it
    del blocks
    held = _rss()
    assert release_freed_memory()
    assert _rss() < held - (200 << 20)  # most of the 23 x 16 MiB freed blocks went back
    del keep
