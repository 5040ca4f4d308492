"""Shared fixtures: the real pretrained MiniLM (loaded once per session) and quiet HF logging."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def minilm():
    """The pretrained all-MiniLM-L6-v2 as a ModelGraph (do not edit it in place: copy())."""
    import modelpress

    return modelpress.load()
