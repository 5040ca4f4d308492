"""Shared fixtures: the real pretrained MiniLM (loaded once per session), the digits zoo models (trained once
per machine) and quiet HF logging."""

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


@pytest.fixture(scope="session")
def zoo_vit():
    """The digits ViT from the machine's zoo cache (trained there on first use, about a minute)."""
    pytest.importorskip("sklearn")
    from modelpress.train.zoo import digits_vit

    return digits_vit()


@pytest.fixture(scope="session")
def zoo_cnn():
    """The digits CNN from the machine's zoo cache (trained there on first use, a few seconds)."""
    pytest.importorskip("sklearn")
    from modelpress.train.zoo import digits_cnn

    return digits_cnn()


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Ctrl-C tests need Python's own SIGINT handler; a runner started in the background (nohup, `&`) inherits
    SIGINT ignored, and Python then never installs it. Install it for every test and put back what was there."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
