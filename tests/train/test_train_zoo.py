"""The digits model zoo (trained through modelpress.train): accurate, cached (fast and identical on reload),
deterministic, atomic writes."""

from __future__ import annotations

import time

import numpy as np
import torch

from modelpress.data import ClassificationTask, load_data, torch_runner
from modelpress.train.zoo import DigitsCNN, ZooModel, digits_cnn, digits_cnn_factory, digits_vit, zoo_dir


def test_vit_accuracy(zoo_vit) -> None:  # noqa: ANN001
    from transformers import ViTForImageClassification

    assert isinstance(zoo_vit, ZooModel) and isinstance(zoo_vit.module, ViTForImageClassification)
    assert zoo_vit.test_accuracy >= 0.95
    assert not zoo_vit.module.training
    cfg = zoo_vit.module.config
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.num_labels) == (8, 2, 1, 10)
    assert zoo_vit.input_spec.kind == "image" and zoo_vit.input_spec.names == ["pixel_values"]
    assert tuple(zoo_vit.input_spec.shape) == (1, 8, 8)
    files = {p.name for p in zoo_vit.path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


def test_cnn_accuracy(zoo_cnn) -> None:  # noqa: ANN001
    assert isinstance(zoo_cnn.module, DigitsCNN) and not zoo_cnn.module.training
    assert zoo_cnn.test_accuracy >= 0.95
    assert {p.name for p in zoo_cnn.path.iterdir()} == {"model.safetensors", "zoo.json"}


def test_reload_is_fast_and_identical(zoo_vit, zoo_cnn) -> None:  # noqa: ANN001
    x = torch.from_numpy(zoo_vit.input_spec.make(batch=4)["pixel_values"])
    for first, load in ((zoo_vit, digits_vit), (zoo_cnn, digits_cnn)):
        start = time.perf_counter()
        again = load()
        assert time.perf_counter() - start < 1.0
        assert again.path == first.path and again.test_accuracy == first.test_accuracy
        assert again.module is not first.module  # a fresh copy: callers may edit theirs
        with torch.no_grad():
            a = torch_runner(first.module, ["pixel_values"])({"pixel_values": x.numpy()})
            b = torch_runner(again.module, ["pixel_values"])({"pixel_values": x.numpy()})
        np.testing.assert_array_equal(a, b)


def test_accuracy_through_task_and_data(zoo_vit) -> None:  # noqa: ANN001
    data = load_data("digits", zoo_vit.input_spec, n_evaluation=None, batch_size=64)
    m = ClassificationTask().evaluate(
        torch_runner(zoo_vit.module, zoo_vit.input_spec.names), None, data.evaluation
    )
    assert m["accuracy"] == zoo_vit.test_accuracy  # the same held-out split


def test_training_is_deterministic_and_leaves_global_state(tmp_path, zoo_cnn) -> None:  # noqa: ANN001
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    fresh = digits_cnn(seed=0, cache_dir=tmp_path)  # trains again, into another cache
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert not torch.are_deterministic_algorithms_enabled()
    assert fresh.path.parent == tmp_path and fresh.path != zoo_cnn.path
    for (k, a), (_, b) in zip(
        zoo_cnn.module.state_dict().items(), fresh.module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == [fresh.path.name]  # no temporary folders left
    assert fresh.meta["seed"] == 0 and fresh.meta["train_seconds"] > 0


def test_zoo_dir(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    assert zoo_dir() == tmp_path / "zoo"
    assert zoo_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("MODELPRESS_CACHE")
    assert zoo_dir().parts[-3:] == (".cache", "modelpress", "zoo")


def test_factory(zoo_cnn) -> None:  # noqa: ANN001
    module = digits_cnn_factory()
    assert isinstance(module, DigitsCNN) and not module.training
    for a, b in zip(module.state_dict().values(), zoo_cnn.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_digits_cnn_accuracy_and_cache() -> None:
    first = digits_cnn()
    assert first.test_accuracy >= 0.95
    t = time.perf_counter()
    again = digits_cnn()
    assert time.perf_counter() - t < 5
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(first.module(x), again.module(x))
