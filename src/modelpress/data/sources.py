"""Calibration, evaluation and train data: packaged sentences, scikit-learn digits, text files, image folders,
npz.

``load_data(spec, input_spec, tokenizer)`` turns a ``--data`` value into a :class:`TaskData`: splits of
model-ready batches (keys = ``input_spec.names``), with labels where the source has them. Evaluation never
overlaps calibration or train; train (built on first use) is everything the source has outside evaluation.

Packaged English text (``sentences/``, see its README.md): ``calibration.txt`` (200 sentences) and
``evaluation.txt`` (240), written for modelpress, and ``train.txt.gz``, 32,634 unlabeled sentences for
recovery training that install with the package (no download): the example sentences of WordNet 3.0
(Princeton University, WordNet 3.0 licence: use, copy, modify and distribute with its notice) and sentences of
the CIA World Factbook's prose (a US government work, public domain). It shares no sentence with the other
two files and no run of 8 words with the evaluation sentences (tests/data check it); it is rebuilt by
``tools/build_train_sentences.py``.
"""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.data.digits import digits_split
from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec

__all__ = ["DataSplit", "TaskData", "digits_split", "load_data", "packaged_sentences"]

DATA_HINT = "pass --data digits | text:FILE | images:DIR | tensors:FILE.npz"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class DataSplit:
    """Batches of model inputs (torch tensors keyed by input name) and, optionally, labels per batch."""

    batches: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        """Number of samples (not batches)."""
        total = 0
        for batch in self.batches:
            first = next(iter(batch.values()), None)
            total += 0 if first is None else int(first.shape[0])
        return total

    def numpy_batches(self) -> list[dict[str, np.ndarray]]:
        """The batches as numpy arrays (for ONNX Runtime and the Tasks' runners)."""
        return [{k: v.detach().cpu().numpy() for k, v in batch.items()} for batch in self.batches]

    def all_labels(self) -> np.ndarray | None:
        """All labels concatenated in sample order, or None when the split has none."""
        if self.labels is None:
            return None
        return torch.cat([lab.reshape(-1) for lab in self.labels]).cpu().numpy()


@dataclass
class TaskData:
    """The splits of one data source: calibration and evaluation never overlap, nor do train and evaluation.

    ``train`` is built on first use by ``make_train`` (tokenizing a text source's train part costs time that
    runs without training should not pay); it may contain the calibration samples.
    """

    calibration: DataSplit
    evaluation: DataSplit
    description: str
    make_train: Callable[[], DataSplit] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def train(self) -> DataSplit:
        """The train split: every sample of the source outside evaluation (built once, on first use)."""
        if self.make_train is None:
            raise ModelpressError(
                f"the data ({self.description}) has no train split",
                "load it with modelpress.data.load_data, or pass make_train to TaskData",
            )
        return self.make_train()


def packaged_sentences(split: str) -> list[str]:
    """The English sentences shipped with modelpress; ``split``: "calibration", "evaluation", "corpus" or
    "train".

    "calibration" and "evaluation" are disjoint files; "corpus" is the unlabeled training corpus
    (``train.txt.gz``, see the module docstring), disjoint from both; "train" is every sentence outside
    evaluation: the calibration sentences, then the corpus.
    """
    if split not in ("calibration", "evaluation", "corpus", "train"):
        raise ValueError(f"split must be 'calibration', 'evaluation', 'corpus' or 'train', not {split!r}")
    if split == "train":
        return _sentence_file("calibration.txt") + _sentence_file("train.txt.gz")
    return _sentence_file("train.txt.gz" if split == "corpus" else f"{split}.txt")


@functools.lru_cache(maxsize=4)
def _read_sentences(name: str) -> tuple[str, ...]:
    data = resources.files("modelpress.data").joinpath("sentences", name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())


def _sentence_file(name: str) -> list[str]:
    return list(_read_sentences(name))


def load_data(
    spec: str | None,
    input_spec: InputSpec,
    tokenizer: Any = None,
    *,
    batch_size: int = 16,
    n_calibration: int = 64,
    n_evaluation: int | None = 200,
    max_length: int = 128,
    seed: int = 0,
) -> TaskData:
    """Load calibration and evaluation data for a model described by ``input_spec``.

    ``spec``: None (the packaged sentences, text models only), "digits", "text:FILE", "images:DIR"
    or "tensors:FILE.npz". ``tokenizer`` tokenizes text (required for text); for images it may be an HF
    image processor whose ``image_mean``/``image_std`` normalize the [0, 1] pixels. ``n_evaluation=None``
    keeps every evaluation sample. Sources smaller than ``n_calibration + n_evaluation`` are split in
    proportion. ``seed`` chooses which samples land in each split, deterministically. The train split
    (``TaskData.train``, built on first use) holds every sample outside evaluation: the zoo's training part
    of digits, the packaged sentences outside evaluation (:func:`packaged_sentences`), and for files and
    folders whatever evaluation does not take (calibration included).
    """
    if batch_size < 1 or n_calibration < 1 or (n_evaluation is not None and n_evaluation < 1):
        raise ModelpressError(
            f"invalid data sizes: batch_size={batch_size}, n_calibration={n_calibration}, "
            f"n_evaluation={n_evaluation}",
            "use positive numbers",
        )
    if spec is None or spec.strip() in ("", "default", "sentences"):
        return _default(input_spec, tokenizer, batch_size, n_calibration, n_evaluation, max_length, seed)
    spec = spec.strip()
    if spec == "digits":
        return _digits(input_spec, batch_size, n_calibration, n_evaluation, seed)
    prefix, sep, rest = spec.partition(":")
    if sep and rest:
        path = Path(rest).expanduser()
        if prefix == "text":
            return _text_file(
                path, input_spec, tokenizer, batch_size, n_calibration, n_evaluation, max_length, seed
            )
        if prefix == "images":
            return _images(path, input_spec, tokenizer, batch_size, n_calibration, n_evaluation, seed)
        if prefix == "tensors":
            return _tensors(path, input_spec, batch_size, n_calibration, n_evaluation, seed)
    raise ModelpressError(f"unknown data source {spec!r}", DATA_HINT)


# -- sources -------------------------------------------------------------------------------------------------


def _default(
    input_spec: InputSpec,
    tokenizer: Any,
    batch_size: int,
    n_cal: int,
    n_eval: int | None,
    max_length: int,
    seed: int,
) -> TaskData:
    if input_spec.kind != "text":
        raise ModelpressError(
            f"no default data fits a model with {input_spec.kind} inputs (the packaged data are sentences)",
            DATA_HINT,
        )
    cal_lines = packaged_sentences("calibration")
    eval_lines = packaged_sentences("evaluation")
    rng = np.random.default_rng(seed)
    cal_idx = np.sort(rng.permutation(len(cal_lines))[: min(n_cal, len(cal_lines))])
    cal = [cal_lines[i] for i in cal_idx]
    ev = eval_lines if n_eval is None else eval_lines[:n_eval]  # fixed, so runs with other seeds compare
    return TaskData(
        calibration=_text_split(cal, input_spec, tokenizer, batch_size, max_length),
        evaluation=_text_split(ev, input_spec, tokenizer, batch_size, max_length),
        description=f"packaged English sentences: {len(cal)} calibration, {len(ev)} evaluation",
        make_train=lambda: _text_split(
            packaged_sentences("train"), input_spec, tokenizer, batch_size, max_length
        ),
    )


def _digits(input_spec: InputSpec, batch_size: int, n_cal: int, n_eval: int | None, seed: int) -> TaskData:
    _check_image_shape(input_spec, (1, 8, 8), "scikit-learn digits")
    # The split is always the zoo's (split seed 0), so evaluation never overlaps zoo training data;
    # ``seed`` only chooses which calibration samples are taken from the training part.
    x_train, y_train, x_test, y_test = digits_split()
    rng = np.random.default_rng(seed)
    cal_idx = rng.permutation(len(x_train))[:n_cal]
    n_eval = len(x_test) if n_eval is None else min(n_eval, len(x_test))
    name = input_spec.names[0]
    return TaskData(
        calibration=_array_split({name: x_train[cal_idx]}, y_train[cal_idx], batch_size),
        evaluation=_array_split({name: x_test[:n_eval]}, y_test[:n_eval], batch_size),
        description=f"scikit-learn digits: {len(cal_idx)} calibration (train part), "
        f"{n_eval} evaluation (held-out part)",
        make_train=lambda: _array_split({name: x_train}, y_train, batch_size),
    )


def _text_file(
    path: Path,
    input_spec: InputSpec,
    tokenizer: Any,
    batch_size: int,
    n_cal: int,
    n_eval: int | None,
    max_length: int,
    seed: int,
) -> TaskData:
    if input_spec.kind != "text":
        raise ModelpressError(
            f"text data does not fit a model with {input_spec.kind} inputs",
            "pass --data images:DIR, digits or tensors:FILE.npz for this model",
        )
    if not path.is_file():
        raise ModelpressError(
            f"text file {str(path)!r} not found", "pass text:FILE with one sentence per line"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelpressError(
            f"{path} is not UTF-8 text ({err})", "save it as UTF-8, one sentence per line"
        ) from err
    lines = list(dict.fromkeys(line.strip() for line in raw.splitlines() if line.strip()))  # unique, in order
    if len(lines) < 2:
        raise ModelpressError(
            f"{path} has {len(lines)} distinct non-empty lines",
            "give at least two sentences (one per line): some for calibration, some for evaluation",
        )
    cal_idx, eval_idx = _split_indices(len(lines), n_cal, n_eval, seed)
    cal = [lines[i] for i in cal_idx]
    ev = [lines[i] for i in eval_idx]
    train = [lines[i] for i in _outside(len(lines), eval_idx)]
    return TaskData(
        calibration=_text_split(cal, input_spec, tokenizer, batch_size, max_length),
        evaluation=_text_split(ev, input_spec, tokenizer, batch_size, max_length),
        description=f"{path.name}: {len(cal)} calibration, {len(ev)} evaluation sentences",
        make_train=lambda: _text_split(train, input_spec, tokenizer, batch_size, max_length),
    )


def _images(
    root: Path,
    input_spec: InputSpec,
    processor: Any,
    batch_size: int,
    n_cal: int,
    n_eval: int | None,
    seed: int,
) -> TaskData:
    if input_spec.kind == "text":
        raise ModelpressError("image data does not fit a text model", "pass --data text:FILE, or no --data")
    if len(input_spec.shape) != 3:
        raise ModelpressError(
            f"the model's input shape {tuple(input_spec.shape)} is not (channels, height, width)",
            "image folders feed image models; pass --data tensors:FILE.npz for other inputs",
        )
    if not root.is_dir():
        raise ModelpressError(
            f"image folder {str(root)!r} not found", "pass images:DIR (subfolders = classes)"
        )
    channels, height, width = (int(s) for s in input_spec.shape)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise ModelpressError(
            f"cannot make {channels}-channel images from an image folder", "pass --data tensors:FILE.npz"
        )
    try:
        from PIL import Image
    except ImportError as err:
        raise ModelpressError(
            "reading image folders needs Pillow, which is not installed",
            "pip install pillow, or save the images as an .npz and pass --data tensors:FILE.npz",
        ) from err

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, label) for label, c in enumerate(classes) for f in _image_files(root / c)]
    else:
        files = [(f, -1) for f in _image_files(root)]
    if len(files) < 2:
        raise ModelpressError(
            f"{root} holds {len(files)} images", "put at least two images in it (subfolders name the classes)"
        )
    arrays = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as err:
            raise ModelpressError(f"cannot read image {path}: {err}", "remove or fix the file") from err
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    x = np.stack(arrays)
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is not None and std is not None and np.size(mean) in (1, channels):
        x = (x - np.asarray(mean, np.float32).reshape(-1, 1, 1)) / np.asarray(std, np.float32).reshape(
            -1, 1, 1
        )
    x = x.astype(np.float32)
    y = np.asarray([label for _, label in files], dtype=np.int64) if classes else None
    cal_idx, eval_idx = _split_indices(len(x), n_cal, n_eval, seed)
    train_idx = _outside(len(x), eval_idx)
    name = input_spec.names[0]
    return TaskData(
        calibration=_array_split({name: x[cal_idx]}, None if y is None else y[cal_idx], batch_size),
        evaluation=_array_split({name: x[eval_idx]}, None if y is None else y[eval_idx], batch_size),
        description=f"images in {root} ({len(classes) or 'no'} classes): {len(cal_idx)} calibration, "
        f"{len(eval_idx)} evaluation",
        make_train=lambda: _array_split(
            {name: x[train_idx]}, None if y is None else y[train_idx], batch_size
        ),
    )


def _tensors(
    path: Path, input_spec: InputSpec, batch_size: int, n_cal: int, n_eval: int | None, seed: int
) -> TaskData:
    if not path.is_file():
        raise ModelpressError(
            f"tensor file {str(path)!r} not found",
            "pass tensors:FILE.npz (arrays named like the model's inputs)",
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, AttributeError) as err:
        raise ModelpressError(
            f"cannot read {path} as an .npz of arrays ({err})",
            "save it with numpy.savez(path, <input name>=array, labels=array); object arrays are refused",
        ) from err
    labels = stored.pop("labels", None)
    names = list(input_spec.names)
    if all(n in stored for n in names):
        arrays = {n: stored[n] for n in names}
    elif len(names) == 1 and len(stored) == 1:
        arrays = {names[0]: next(iter(stored.values()))}
    elif input_spec.kind == "text" and "input_ids" in stored and "input_ids" in names:
        arrays = {n: stored[n] for n in names if n in stored}
    else:
        raise ModelpressError(
            f"{path.name} holds arrays {sorted(stored)}, the model takes {names}",
            "name the arrays like the model's inputs (plus an optional 'labels')",
        )
    n = _check_arrays(arrays, input_spec, path.name)
    if input_spec.kind == "text":
        arrays = _complete_text_inputs({k: v.astype(np.int64) for k, v in arrays.items()}, input_spec)
    else:
        arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    if labels is not None:
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ModelpressError(
                f"'labels' in {path.name} has shape {labels.shape} and dtype {labels.dtype}",
                f"labels must be integers of shape ({n},), one class index per sample",
            )
        labels = labels.astype(np.int64)
    if n < 2:
        raise ModelpressError(
            f"{path.name} holds {n} samples", "give at least two (calibration and evaluation)"
        )
    cal_idx, eval_idx = _split_indices(n, n_cal, n_eval, seed)
    train_idx = _outside(n, eval_idx)
    return TaskData(
        calibration=_array_split(
            {k: v[cal_idx] for k, v in arrays.items()},
            None if labels is None else labels[cal_idx],
            batch_size,
        ),
        evaluation=_array_split(
            {k: v[eval_idx] for k, v in arrays.items()},
            None if labels is None else labels[eval_idx],
            batch_size,
        ),
        description=f"{path.name}: {len(cal_idx)} calibration, {len(eval_idx)} evaluation samples"
        + (", labelled" if labels is not None else ""),
        make_train=lambda: _array_split(
            {k: v[train_idx] for k, v in arrays.items()},
            None if labels is None else labels[train_idx],
            batch_size,
        ),
    )


# -- helpers -------------------------------------------------------------------------------------------------


def _split_indices(n: int, n_cal: int, n_eval: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (calibration, evaluation) indices from a seeded permutation.

    Evaluation takes ``n_eval`` samples (all that calibration leaves when None); when ``n`` is smaller
    than both together, the two are shrunk in proportion, keeping at least one sample in each.
    """
    if n_eval is None:
        k_eval = n - min(n_cal, n // 2)
    elif n >= n_cal + n_eval:
        k_eval = n_eval
    else:
        k_eval = math.ceil(n * n_eval / (n_cal + n_eval))
    k_eval = min(max(k_eval, 1), n - 1)
    k_cal = min(n_cal, n - k_eval)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k_eval : k_eval + k_cal]), np.sort(perm[:k_eval])


def _outside(n: int, taken: np.ndarray) -> np.ndarray:
    """The sorted indices in ``range(n)`` that ``taken`` lacks (the train part: all but evaluation)."""
    keep = np.ones(n, dtype=bool)
    keep[taken] = False
    return np.nonzero(keep)[0]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_image_shape(input_spec: InputSpec, shape: tuple[int, ...], source: str) -> None:
    if input_spec.kind == "text":
        raise ModelpressError(f"{source} do not fit a text model", "pass --data text:FILE, or no --data")
    if tuple(input_spec.shape) != shape:
        raise ModelpressError(
            f"{source} have shape {shape}, the model takes {tuple(input_spec.shape)}",
            "use data of the model's input shape: --data images:DIR (resized) or tensors:FILE.npz",
        )


def _check_arrays(arrays: dict[str, np.ndarray], input_spec: InputSpec, source: str) -> int:
    """Check the arrays against the input spec; returns the number of samples."""
    counts = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ModelpressError(
            f"arrays in {source} differ in length: {counts}", "give every input one row per sample"
        )
    for k, v in arrays.items():
        if input_spec.kind == "text":
            if v.ndim != 2 or not np.issubdtype(v.dtype, np.integer):
                raise ModelpressError(
                    f"{k!r} in {source} has shape {v.shape} and dtype {v.dtype}",
                    "text inputs are integer arrays of shape (samples, sequence)",
                )
            if v.shape != arrays[next(iter(arrays))].shape:
                raise ModelpressError(
                    f"text inputs in {source} differ in shape", "give all of them one shape"
                )
        else:
            if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
                raise ModelpressError(f"{k!r} in {source} has dtype {v.dtype}", "give numeric arrays")
            if np.issubdtype(v.dtype, np.floating) and v.ndim and not np.isfinite(v).all():
                # a NaN or inf sample poisons calibration statistics and every metric it lands in
                bad = np.nonzero(~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1))[0]
                shown = ", ".join(str(int(i)) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
                raise ModelpressError(
                    f"{k!r} in {source} holds NaN or infinite values in {len(bad)} of {v.shape[0]} samples "
                    f"(rows {shown})",
                    "drop or repair those samples (e.g. numpy.nan_to_num) and save the file again",
                )
            if input_spec.shape and tuple(v.shape[1:]) != tuple(input_spec.shape):
                raise ModelpressError(
                    f"{k!r} in {source} has samples of shape {tuple(v.shape[1:])}, "
                    f"the model takes {tuple(input_spec.shape)}",
                    f"save an array of shape (samples, {', '.join(str(s) for s in input_spec.shape)})",
                )
    return next(iter(counts.values()))


def _complete_text_inputs(arrays: dict[str, Any], input_spec: InputSpec) -> dict[str, Any]:
    """Order the inputs like the model's and add the ones the source lacks (attention_mask = ones,
    token_type_ids = zeros); other missing inputs are left to the model's defaults."""
    ids = arrays["input_ids"]
    numpy = isinstance(ids, np.ndarray)
    out = {}
    for name in input_spec.names:
        if name in arrays:
            out[name] = arrays[name]
        elif name == "attention_mask":
            out[name] = np.ones_like(ids) if numpy else torch.ones_like(ids)
        elif name == "token_type_ids":
            out[name] = np.zeros_like(ids) if numpy else torch.zeros_like(ids)
    return out


def _text_split(
    lines: list[str], input_spec: InputSpec, tokenizer: Any, batch_size: int, max_length: int
) -> DataSplit:
    if tokenizer is None:
        raise ModelpressError(
            "text data needs the model's tokenizer, and none was found",
            "load the model from a folder that holds its tokenizer files (tokenizer.json, vocab.txt, ...)",
        )
    batches = []
    for start in range(0, len(lines), batch_size):
        chunk = lines[start : start + batch_size]
        if getattr(tokenizer, "pad_token_id", None) is None:
            enc = _pad_without_pad_token(tokenizer, chunk, max_length)
        else:
            enc = dict(
                tokenizer(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
            )
        if "input_ids" not in enc:
            raise ModelpressError(
                f"the tokenizer produced {sorted(enc)}, without input_ids",
                "check that the tokenizer belongs to the model",
            )
        batch = {k: torch.as_tensor(v).to(torch.int64) for k, v in enc.items() if k in input_spec.names}
        batch.setdefault("input_ids", torch.as_tensor(enc["input_ids"]).to(torch.int64))
        batches.append(_complete_text_inputs(batch, input_spec))
    return DataSplit(batches=batches)


def _pad_without_pad_token(tokenizer: Any, lines: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``lines`` with a tokenizer that has no pad token (GPT-2's, Llama's) and pad them here, on the
    right, with the eos token (else id 0); ``attention_mask`` marks the padding, so models and the
    language-model task ignore it. The tokenizer itself is left unchanged (it is saved with the model)."""
    enc = tokenizer(lines, truncation=True, max_length=max_length)
    rows = [list(ids) for ids in enc["input_ids"]]
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0 else 0
    width = max((len(r) for r in rows), default=0)
    out: dict[str, torch.Tensor] = {}
    for key, values in enc.items():
        fill = pad if key == "input_ids" else 0
        if isinstance(values, list) and all(isinstance(v, list) for v in values):
            out[key] = torch.tensor([list(v) + [fill] * (width - len(v)) for v in values], dtype=torch.int64)
    out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
    return out


def _array_split(arrays: dict[str, np.ndarray], labels: np.ndarray | None, batch_size: int) -> DataSplit:
    n = len(next(iter(arrays.values())))
    batches = [
        {k: torch.from_numpy(np.ascontiguousarray(v[i : i + batch_size])) for k, v in arrays.items()}
        for i in range(0, n, batch_size)
    ]
    labs = None
    if labels is not None:
        labs = [
            torch.from_numpy(np.ascontiguousarray(labels[i : i + batch_size]))
            for i in range(0, n, batch_size)
        ]
    return DataSplit(batches=batches, labels=labs)
