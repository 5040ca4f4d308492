"""Shared fixtures: the real pretrained MiniLM (loaded once per session), the digits zoo models (trained once
per machine), quiet HF logging and one torch thread for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_finish(session: pytest.Session) -> None:
    """The imported libraries and test modules out of the full collections the memory steps run (as the
    command does before loading a model: system.freeze_loaded_code); in this process they are many more."""
    from modelpress.system import freeze_loaded_code

    freeze_loaded_code(("torch", "transformers", "onnx", "onnxruntime"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Every test runs torch on one intra-op thread (ONNX Runtime keeps its target's threads).

    The suite's models are tiny (and MiniLM small): on a 2-core machine that anything else also uses, two
    torch threads wait on each other far longer than they compute. Measured on the CI machine with a second
    job running: tests/cli/test_compress_e2e.py 961 s with two threads, 201 s with one;
    tests/quantize/test_hybrid_export.py 83 s and 33 s. On an idle machine the two are within noise
    (tests/quantize: 91 s and 84 s; test_compress_e2e: 138 s and 151 s). Module- and session-scoped
    fixtures are covered too (a session fixture is set up first)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread_per_test(_one_torch_thread):  # noqa: ANN001, ANN202
    """Each test starts on one thread again, whatever an earlier test left: training and recovery tests
    check bit-identical weights across runs, which the thread count can change."""
    import torch

    torch.set_num_threads(1)
    yield


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


@pytest.fixture
def short_timing(monkeypatch):
    """Latency measured with few runs per round (3, at least 50 ms) for end-to-end tests that check a latency
    is measured and reported, not its value: on MiniLM at batch 8 the default 10-12 runs per round and
    variant are most of a command's time. Tests that assert on speed never use this."""
    from modelpress import bench
    from modelpress.bench import candidates, runner

    real = runner.measure

    def measure(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        kwargs["runs"] = min(kwargs.get("runs", 10), 3)
        kwargs["min_time_s"] = min(kwargs.get("min_time_s", 0.3), 0.05)
        return real(*args, **kwargs)

    for module in (bench, candidates, runner):
        monkeypatch.setattr(module, "measure", measure)
