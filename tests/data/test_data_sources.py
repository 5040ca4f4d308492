"""load_data: every source kind, shapes and splits, and clear errors for bad specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.data import DataSplit, TaskData, digits_split, load_data, packaged_sentences
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec

TEXT = InputSpec(kind="text", names=["input_ids", "attention_mask", "token_type_ids"])
DIGITS = InputSpec(kind="image", names=["pixel_values"], shape=(1, 8, 8))


def _decode_all(split: DataSplit, tokenizer) -> list[str]:  # noqa: ANN001
    out = []
    for batch in split.batches:
        out += tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return out


def test_default_text(minilm_tokenizer) -> None:  # noqa: ANN001
    data = load_data(None, TEXT, minilm_tokenizer)
    assert isinstance(data, TaskData) and "packaged" in data.description
    assert len(data.calibration) == 64 and len(data.evaluation) == 200
    assert len(data.evaluation.batches) == 13  # 200 / 16, last batch partial
    assert data.calibration.labels is None
    for batch in data.calibration.batches + data.evaluation.batches:
        assert list(batch) == TEXT.names
        assert all(v.dtype == torch.int64 for v in batch.values())
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 128
        assert (mask.sum(1) == mask.shape[1]).any()  # padded per batch to its longest sentence
    cal = {s.lower() for s in _decode_all(data.calibration, minilm_tokenizer)}
    ev = _decode_all(data.evaluation, minilm_tokenizer)
    assert not cal & set(ev)
    assert ev[:3] == [s.lower() for s in packaged_sentences("evaluation")[:3]]  # evaluation is fixed
    nb = data.evaluation.numpy_batches()
    assert nb[0]["input_ids"].dtype == np.int64


def test_default_text_seed_and_sizes(minilm_tokenizer) -> None:  # noqa: ANN001
    a = load_data(None, TEXT, minilm_tokenizer, n_calibration=8, n_evaluation=None, batch_size=4, seed=1)
    b = load_data(None, TEXT, minilm_tokenizer, n_calibration=8, n_evaluation=None, batch_size=4, seed=2)
    assert len(a.calibration) == 8 and len(a.evaluation) == len(packaged_sentences("evaluation"))
    assert not all(
        torch.equal(x["input_ids"], y["input_ids"])
        for x, y in zip(a.calibration.batches, b.calibration.batches, strict=True)
    )
    short = load_data(None, TEXT, minilm_tokenizer, n_calibration=4, n_evaluation=4, max_length=8)
    assert max(b["input_ids"].shape[1] for b in short.evaluation.batches) <= 8


def test_default_needs_text_model() -> None:
    with pytest.raises(ModelpressError) as err:
        load_data(None, DIGITS)
    assert "--data" in str(err.value.hint) and "digits" in str(err.value.hint)


def test_text_needs_tokenizer() -> None:
    with pytest.raises(ModelpressError, match="tokenizer"):
        load_data(None, TEXT, None)


def test_digits() -> None:
    data = load_data("digits", DIGITS, batch_size=32, n_calibration=100, n_evaluation=200)
    assert len(data.calibration) == 100 and len(data.evaluation) == 200
    for split in (data.calibration, data.evaluation):
        x = torch.cat([b["pixel_values"] for b in split.batches])
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (1, 8, 8)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
        labels = split.all_labels()
        assert labels is not None and len(labels) == len(split)
    counts = np.bincount(data.evaluation.all_labels(), minlength=10)
    assert counts.min() >= 10  # every class present in a seeded split
    # evaluation comes from the held-out part of the zoo's split, calibration from its train part
    x_train, _, x_test, y_test = digits_split()
    ev = torch.cat([b["pixel_values"] for b in data.evaluation.batches]).numpy()
    np.testing.assert_array_equal(ev, x_test[:200])
    np.testing.assert_array_equal(data.evaluation.all_labels(), y_test[:200])
    cal = torch.cat([b["pixel_values"] for b in data.calibration.batches]).numpy().reshape(100, -1)
    test_rows = {r.tobytes() for r in x_test.reshape(len(x_test), -1)}
    train_rows = {r.tobytes() for r in x_train.reshape(len(x_train), -1)}
    assert all(r.tobytes() in train_rows for r in cal)
    assert sum(r.tobytes() in test_rows for r in cal) <= 2  # sklearn digits has a few duplicate images


def test_digits_split_is_deterministic() -> None:
    a, b = digits_split(), digits_split()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(a[0]) + len(a[2]) == 1797 and len(a[2]) == 359
    assert not np.array_equal(digits_split(1)[3], a[3])


def test_digits_wrong_shape() -> None:
    with pytest.raises(ModelpressError, match="shape"):
        load_data("digits", InputSpec(kind="image", names=["pixel_values"], shape=(3, 224, 224)))
    with pytest.raises(ModelpressError):
        load_data("digits", TEXT)


def test_tensors_roundtrip(tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 50)
    path = tmp_path / "t.npz"
    np.savez(path, pixel_values=x, labels=y)
    data = load_data(f"tensors:{path}", DIGITS, n_calibration=20, n_evaluation=30, batch_size=8)
    assert len(data.calibration) == 20 and len(data.evaluation) == 30
    got = np.concatenate(
        [b["pixel_values"] for b in data.calibration.numpy_batches() + data.evaluation.numpy_batches()]
    )
    labels = np.concatenate([data.calibration.all_labels(), data.evaluation.all_labels()])
    order = np.lexsort(got.reshape(50, -1).T)
    ref = np.lexsort(x.reshape(50, -1).T)
    np.testing.assert_array_equal(got[order], x[ref])  # every sample once, across the two splits
    np.testing.assert_array_equal(labels[order], y[ref])
    again = load_data(f"tensors:{path}", DIGITS, n_calibration=20, n_evaluation=30, batch_size=8)
    assert torch.equal(
        again.evaluation.batches[0]["pixel_values"], data.evaluation.batches[0]["pixel_values"]
    )


def test_tensors_small_file_split_in_proportion(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "small.npz"
    np.savez(path, x=np.zeros((10, 1, 8, 8), np.float32))  # one array, any name, for a one-input model
    data = load_data(f"tensors:{path}", DIGITS)
    assert len(data.calibration) + len(data.evaluation) == 10
    assert len(data.calibration) >= 1 and len(data.evaluation) >= 1
    assert data.evaluation.labels is None


def test_tensors_text(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "ids.npz"
    np.savez(path, input_ids=np.arange(40, dtype=np.int32).reshape(8, 5))
    data = load_data(f"tensors:{path}", TEXT, n_calibration=4, n_evaluation=4)
    batch = data.evaluation.batches[0]
    assert list(batch) == TEXT.names and batch["input_ids"].dtype == torch.int64
    assert bool((batch["attention_mask"] == 1).all()) and bool((batch["token_type_ids"] == 0).all())


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"pixel_values": np.zeros((5, 1, 4, 4), np.float32)}, "shape"),
        ({"a": np.zeros((5, 1, 8, 8)), "b": np.zeros((5, 1, 8, 8))}, "holds arrays"),
        ({"pixel_values": np.zeros((5, 1, 8, 8)), "labels": np.zeros(4, np.int64)}, "labels"),
        ({"pixel_values": np.zeros((5, 1, 8, 8)), "labels": np.zeros(5, np.float32)}, "labels"),
    ],
)
def test_tensors_bad(tmp_path, arrays, match) -> None:  # noqa: ANN001
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ModelpressError, match=match) as err:
        load_data(f"tensors:{path}", DIGITS)
    assert err.value.hint


def test_tensors_refuses_pickles(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "obj.npz"
    np.savez(path, pixel_values=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(ModelpressError, match="cannot read"):
        load_data(f"tensors:{path}", DIGITS)


def test_text_file(tmp_path, minilm_tokenizer) -> None:  # noqa: ANN001
    lines = [f"This is sentence number {i} about topic {i % 7}." for i in range(30)]
    path = tmp_path / "s.txt"
    path.write_text("\n".join(lines[:15]) + "\n\n" + "\n".join(lines[15:]) + "\n" + lines[0] + "\n")
    data = load_data(f"text:{path}", TEXT, minilm_tokenizer, n_calibration=10, n_evaluation=20, batch_size=4)
    assert len(data.calibration) == 10 and len(data.evaluation) == 20
    cal = set(_decode_all(data.calibration, minilm_tokenizer))
    ev = set(_decode_all(data.evaluation, minilm_tokenizer))
    assert not cal & ev and len(cal | ev) == 30
    small = load_data(f"text:{path}", TEXT, minilm_tokenizer)  # 30 lines for 64 + 200: in proportion
    assert len(small.calibration) + len(small.evaluation) == 30 and len(small.calibration) >= 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("text:/nonexistent/file.txt", "not found"),
        ("tensors:/nonexistent/file.npz", "not found"),
        ("images:/nonexistent/dir", "not found"),
        ("csv:data.csv", "unknown data source"),
        ("mnist", "unknown data source"),
        ("text:", "unknown data source"),
    ],
)
def test_bad_specs(spec, match, minilm_tokenizer) -> None:  # noqa: ANN001
    input_spec = TEXT if spec.startswith("text") else DIGITS
    with pytest.raises(ModelpressError, match=match) as err:
        load_data(spec, input_spec, minilm_tokenizer)
    assert err.value.hint


def test_empty_text_file(tmp_path, minilm_tokenizer) -> None:  # noqa: ANN001
    path = tmp_path / "empty.txt"
    path.write_text("\n   \n")
    with pytest.raises(ModelpressError, match="0 distinct"):
        load_data(f"text:{path}", TEXT, minilm_tokenizer)


def test_text_file_for_image_model(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "s.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(ModelpressError, match="image"):
        load_data(f"text:{path}", DIGITS)


def test_bad_sizes() -> None:
    with pytest.raises(ModelpressError):
        load_data("digits", DIGITS, batch_size=0)


def test_image_folder(tmp_path) -> None:  # noqa: ANN001
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(6):
            arr = (rng.random((12, 10)) * 255).astype(np.uint8)
            pil.fromarray(arr).save(tmp_path / label / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_data(f"images:{tmp_path}", DIGITS, n_calibration=4, n_evaluation=8)
    assert len(data.calibration) == 4 and len(data.evaluation) == 8
    x = data.evaluation.batches[0]["pixel_values"]
    assert tuple(x.shape[1:]) == (1, 8, 8) and x.dtype == torch.float32
    assert set(data.evaluation.all_labels().tolist()) <= {0, 1}


def test_image_folder_without_pillow(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no PIL")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelpressError, match="Pillow") as err:
        load_data(f"images:{tmp_path}", DIGITS)
    assert "tensors:" in err.value.hint


# -- the train split: everything outside evaluation, built on first use --------------------------------------


def _rows(split: DataSplit, key: str = "pixel_values") -> set[bytes]:
    x = torch.cat([b[key] for b in split.batches]).numpy()
    return {r.tobytes() for r in x.reshape(len(x), -1)}


def test_digits_train_split_is_the_zoo_training_part() -> None:
    data = load_data("digits", DIGITS, batch_size=100, n_calibration=64, n_evaluation=None)
    x_train, y_train, x_test, _ = digits_split()
    assert len(data.train) == len(x_train) == 1438 and len(data.train.batches) == 15
    x = torch.cat([b["pixel_values"] for b in data.train.batches]).numpy()
    np.testing.assert_array_equal(x, x_train)
    np.testing.assert_array_equal(data.train.all_labels(), y_train)
    assert _rows(data.calibration) <= _rows(data.train)  # calibration comes from the train part
    test_rows = {r.tobytes() for r in x_test.reshape(len(x_test), -1)}
    assert len(_rows(data.train) & test_rows) <= 2  # only sklearn's few duplicate images
    assert data.train is data.train  # built once


def test_train_split_leaves_calibration_and_evaluation_unchanged() -> None:
    """Adding the train split moved no sample: same seed, same calibration and evaluation as before."""
    data = load_data("digits", DIGITS, batch_size=32, n_calibration=100, n_evaluation=200, seed=3)
    x_train, y_train, x_test, y_test = digits_split()
    cal_idx = np.random.default_rng(3).permutation(len(x_train))[:100]
    cal = torch.cat([b["pixel_values"] for b in data.calibration.batches]).numpy()
    np.testing.assert_array_equal(cal, x_train[cal_idx])
    np.testing.assert_array_equal(data.calibration.all_labels(), y_train[cal_idx])
    ev = torch.cat([b["pixel_values"] for b in data.evaluation.batches]).numpy()
    np.testing.assert_array_equal(ev, x_test[:200])


def test_tensors_train_split_is_everything_but_evaluation(tmp_path) -> None:  # noqa: ANN001
    x = np.arange(50 * 64, dtype=np.float32).reshape(50, 1, 8, 8)
    y = np.arange(50) % 10
    path = tmp_path / "t.npz"
    np.savez(path, pixel_values=x, labels=y)
    data = load_data(f"tensors:{path}", DIGITS, n_calibration=10, n_evaluation=15, batch_size=8)
    train, ev, cal = _rows(data.train), _rows(data.evaluation), _rows(data.calibration)
    assert len(train) == 35 and not train & ev and cal <= train
    assert len(train | ev) == 50
    first = {r.tobytes(): int(lab) for r, lab in zip(x.reshape(50, -1), y, strict=True)}
    got = torch.cat([b["pixel_values"] for b in data.train.batches]).numpy().reshape(35, -1)
    assert [first[r.tobytes()] for r in got] == data.train.all_labels().tolist()


def test_text_train_splits(tmp_path, minilm_tokenizer) -> None:  # noqa: ANN001
    data = load_data(None, TEXT, minilm_tokenizer)
    # calibration + the packaged corpus (its disjointness from evaluation: test_data_sentences.py)
    assert len(data.train) == len(packaged_sentences("train")) > 30_000
    head = DataSplit(batches=data.train.batches[: len(data.calibration.batches) * 4])
    assert set(_decode_all(data.calibration, minilm_tokenizer)) <= set(_decode_all(head, minilm_tokenizer))
    lines = [f"This is sentence number {i} about topic {i % 7}." for i in range(30)]
    path = tmp_path / "s.txt"
    path.write_text("\n".join(lines) + "\n")
    data = load_data(f"text:{path}", TEXT, minilm_tokenizer, n_calibration=5, n_evaluation=20, batch_size=4)
    train, ev = (
        set(_decode_all(data.train, minilm_tokenizer)),
        set(_decode_all(data.evaluation, minilm_tokenizer)),
    )
    assert len(train) == 10 and not train & ev and len(train | ev) == 30
    assert set(_decode_all(data.calibration, minilm_tokenizer)) <= train


def test_task_data_without_train_split() -> None:
    split = DataSplit(batches=[{"pixel_values": torch.zeros(2, 1, 8, 8)}])
    with pytest.raises(ModelpressError, match="no train split"):
        _ = TaskData(calibration=split, evaluation=split, description="hand-made").train
    assert TaskData(split, split, "hand-made", make_train=lambda: split).train is split
