"""A small seeded model zoo trained on scikit-learn digits, cached on disk so it trains once per machine.

Two models: an HF ``ViTForImageClassification`` (patch 2, 4 blocks) and :class:`DigitsCNN` (plain torch,
one residual connection). Both are trained deterministically from a seed through
:func:`modelpress.train.train` (labels only, no teacher) on the training part of
:func:`~modelpress.data.digits.digits_split`, the train split of ``load_data("digits")``, and scored on its
held-out part, which ``load_data("digits")`` also evaluates on.

Cache: ``$MODELPRESS_CACHE/zoo`` (default ``~/.cache/modelpress/zoo``), one folder per model, version and
seed, written to a temporary folder and renamed into place when complete. Weights are safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.data.digits import digits_split
from modelpress.data.sources import load_data
from modelpress.data.tasks import ClassificationTask
from modelpress.graph.inputs import InputSpec
from modelpress.progress import QUIET, Reporter
from modelpress.train.config import TrainConfig
from modelpress.train.loop import train

__all__ = [
    "DIGITS_INPUT_SPEC",
    "ZOO_VERSION",
    "DigitsCNN",
    "ZooModel",
    "digits_cnn",
    "digits_cnn_factory",
    "digits_vit",
    "zoo_dir",
]

ZOO_VERSION = "2"  # bump when training changes: cached models of other versions are then ignored
DIGITS_INPUT_SPEC = InputSpec(kind="image", names=["pixel_values"], shape=(1, 8, 8))
_META = "zoo.json"


def _digits_input_spec() -> InputSpec:
    """A fresh copy of :data:`DIGITS_INPUT_SPEC` (callers may edit theirs)."""
    return InputSpec(kind="image", names=["pixel_values"], shape=(1, 8, 8))


@dataclass
class ZooModel:
    """A trained zoo model: the module (eval mode), its cache folder and its held-out test accuracy
    (measured on the held-out part of :func:`digits_split` right after loading)."""

    module: nn.Module
    path: Path
    test_accuracy: float
    input_spec: InputSpec = field(default_factory=lambda: _digits_input_spec())
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # seed, version, parameters, train_seconds, ...


# -- models --------------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """conv-bn-relu x3 with one residual connection, global average pool, linear (about 57K parameters).

    8x8 -> conv 32 -> conv 64 stride 2 (4x4) -> conv 64 + residual -> mean over 4x4 -> linear 10.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(pixel_values)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(self.bn3(self.conv3(h)) + h)
        return self.fc(h.mean(dim=(2, 3)))


def _vit_config() -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )


# -- public API ----------------------------------------------------------------------------------------------


def zoo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where zoo models live: ``cache_dir`` if given, else ``$MODELPRESS_CACHE/zoo``, else
    ``~/.cache/modelpress/zoo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("MODELPRESS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modelpress") / "zoo"


def digits_vit(
    seed: int = 0, cache_dir: str | os.PathLike | None = None, reporter: Reporter = QUIET
) -> ZooModel:
    """An HF ViTForImageClassification on digits (8x8, patch 2, width 64, 4 blocks of 4 heads, MLP 256;
    about 200K parameters), trained once from ``seed`` (about 40 s on an idle core), then from cache."""
    from transformers import ViTForImageClassification

    def fit(folder: Path) -> dict[str, Any]:
        with _seeded(seed):
            model = ViTForImageClassification(_vit_config())
            _fit(model, seed, epochs=60, batch_size=64, augment=True, reporter=reporter)
        with _quiet_hf():
            model.save_pretrained(folder, safe_serialization=True)
        return {"parameters": sum(p.numel() for p in model.parameters())}

    folder = _cached("digits_vit", seed, cache_dir, fit, reporter)
    with _quiet_hf(), torch.random.fork_rng(devices=[]):  # loading must not move the caller's RNG
        module = ViTForImageClassification.from_pretrained(folder).eval()
    return _zoo_model("digits_vit", module, folder)


def digits_cnn(
    seed: int = 0, cache_dir: str | os.PathLike | None = None, reporter: Reporter = QUIET
) -> ZooModel:
    """A :class:`DigitsCNN` trained once from ``seed`` (a few seconds) and then loaded from cache."""
    from safetensors.torch import load_file, save_file

    def fit(folder: Path) -> dict[str, Any]:
        with _seeded(seed):
            model = DigitsCNN()
            _fit(model, seed, epochs=12, batch_size=32, augment=False, reporter=reporter)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return {"parameters": sum(p.numel() for p in model.parameters()), "channels": [32, 64]}

    folder = _cached("digits_cnn", seed, cache_dir, fit, reporter)
    meta = json.loads((folder / _META).read_text())
    with torch.random.fork_rng(devices=[]):  # the throwaway initialization must not move the caller's RNG
        module = DigitsCNN(channels=tuple(meta.get("channels", (32, 64))))
    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return _zoo_model("digits_cnn", module.eval(), folder)


def digits_cnn_factory() -> nn.Module:
    """The trained :class:`DigitsCNN` (seed 0, from cache): a zero-argument factory for model loaders,
    e.g. ``modelpress.train.zoo:digits_cnn_factory``. The module says its input shape (``input_spec``)."""
    module = digits_cnn().module
    module.input_spec = _digits_input_spec()
    return module


# -- training and caching ------------------------------------------------------------------------------------


def _zoo_model(name: str, module: nn.Module, folder: Path) -> ZooModel:
    meta = json.loads((folder / _META).read_text())
    return ZooModel(
        module=module,
        path=folder,
        test_accuracy=_accuracy(module),
        input_spec=_digits_input_spec(),
        name=name,
        meta=meta,
    )


@torch.no_grad()
def _accuracy(module: nn.Module) -> float:
    """Accuracy on the held-out part of ``digits_split(0)``."""
    from modelpress.graph.inputs import primary_output

    _, _, x_test, y_test = digits_split()
    module.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is fastest for a model this small, and on a busy machine by far
    try:
        logits = primary_output(module(pixel_values=torch.from_numpy(x_test)))
    finally:
        torch.set_num_threads(threads)
    return float((logits.argmax(dim=1).numpy() == y_test).mean())


def _cached(
    name: str,
    seed: int,
    cache_dir: str | os.PathLike | None,
    fit: Callable[[Path], dict[str, Any]],
    reporter: Reporter,
    version: str = ZOO_VERSION,
) -> Path:
    """The cache folder of ``name``/``version``/``seed``, training into a temporary folder and renaming it if
    absent."""
    root = zoo_dir(cache_dir)
    folder = root / f"{name}-v{version}-seed{seed}"
    if (folder / _META).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any folder
    try:
        start = time.perf_counter()
        meta = fit(tmp)
        meta.update(
            name=name,
            version=version,
            seed=seed,
            train_seconds=round(time.perf_counter() - start, 2),
            torch=torch.__version__,
            machine=platform.machine(),
        )
        (tmp / _META).write_text(json.dumps(meta, indent=2))  # written last: marks the folder complete
        if folder.exists() and not (folder / _META).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a broken leftover
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / _META).is_file():  # not a concurrent writer that finished first
                raise
        reporter.log(f"trained {name} (seed {seed}) in {meta['train_seconds']:.0f} s, cached in {folder}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide transformers' progress bars (loading/writing weights) for the duration."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, run single-threaded with deterministic algorithms; restores the global state after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # reproducible sums, and fast for models this small even on busy machines
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _fit(
    model: nn.Module,
    seed: int,
    *,
    epochs: int,
    batch_size: int,
    augment: bool,
    reporter: Reporter,
    lr: float = 3e-3,
) -> None:
    """Train on ``load_data("digits").train`` (the training part of ``digits_split(0)``) through
    :func:`~modelpress.train.train`: labels
    with smoothing 0.1, AdamW with a one-cycle schedule (10% warm-up), no teacher, no clipping."""
    data = load_data("digits", _digits_input_spec(), batch_size=batch_size).train
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)
    config = TrainConfig(
        steps=steps,
        lr=lr,
        weight_decay=0.05,
        schedule="one_cycle",
        warmup_steps=steps // 10,
        grad_clip=None,
        batch_size=batch_size,
        seed=seed,
        label_weight=1.0,
        label_smoothing=0.1,
        log_every=max(1, steps // 20),
    )
    train(
        model,
        data,
        task=ClassificationTask(),
        config=config,
        reporter=reporter,
        input_names=["pixel_values"],
        augment=_augment_batch if augment else None,
    )
    model.eval()


def _augment_batch(batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {**batch, "pixel_values": _augment(batch["pixel_values"], gen)}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter per image: rotation up to 11 degrees, scale 0.9-1.1, shift up to 0.5 px."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * 0.2
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.125
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
