"""Recovery tests run their small models on one thread: on a busy machine, several threads for a model this
small wait on each other far longer than they compute; one thread also keeps the weights bit-reproducible."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
