"""Training checkpoints without pickle: one safetensors file holding the tensors (student weights, AdamW
state, RNG states, the epoch's sample order) and, in its header metadata, JSON for everything else (step,
data position, scheduler state, optimizer hyperparameters, losses, the recipe a resume must match).

One file, written to a temporary name, flushed to disk and renamed over the previous one: a crash while
writing leaves the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelpress.errors import ModelpressError

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "TrainState",
    "checkpoint_path",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_NAME = "train-checkpoint.safetensors"
FORMAT_VERSION = 1
_META_KEY = "modelpress_train"


@dataclass
class TrainState:
    """Where a training stands between two steps (everything but the tensors of model and optimizer)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs started
    position: int = 0  # next sample within the epoch's order
    order: torch.Tensor | None = None  # the epoch's sample order
    first_order: torch.Tensor | None = None  # the first epoch's (the teacher cache's canonical batches)
    seconds: float = 0.0  # training time so far, earlier runs included
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last log)
    window: tuple[float, int] = (0.0, 0)  # loss sum and count since the last logged step
    last_loss: float | None = None


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by key and the JSON metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def state(self) -> TrainState:
        m = self.meta
        return TrainState(
            step=int(m["step"]),
            epoch=int(m["epoch"]),
            position=int(m["position"]),
            order=self.tensors.get("data.order"),
            first_order=self.tensors.get("data.first_order"),
            seconds=float(m["seconds"]),
            losses=[(int(s), float(v)) for s, v in m["losses"]],
            window=(float(m["window"][0]), int(m["window"][1])),
            last_loss=m["last_loss"],
        )

    def restore(
        self,
        student: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        maps: torch.nn.Module | None = None,
    ) -> None:
        """Load weights (and the hidden-state maps'), optimizer and scheduler state, and the RNG states."""
        weights = {k[len("student.") :]: v for k, v in self.tensors.items() if k.startswith("student.")}
        map_weights = {k[len("maps.") :]: v for k, v in self.tensors.items() if k.startswith("maps.")}
        try:
            student.load_state_dict(weights)
            if maps is not None or map_weights:
                if maps is None:
                    raise RuntimeError("the checkpoint has hidden-state maps and this training none")
                maps.load_state_dict(map_weights)
        except RuntimeError as err:
            raise ModelpressError(
                f"the checkpoint {self.path} does not fit the student ({str(err).splitlines()[0]})",
                "resume with the model the checkpoint was written for, or use another checkpoint_dir",
            ) from err
        optimizer.load_state_dict(_optimizer_state(self.tensors, self.meta["optimizer"]))
        scheduler.load_state_dict(self.meta["scheduler"])
        generator.set_state(self.tensors["rng.data"])
        torch.set_rng_state(self.tensors["rng.torch"])
        cuda = sorted(
            (k for k in self.tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
        )
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([self.tensors[k] for k in cuda])


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """The checkpoint file inside ``directory`` (one per directory: the latest)."""
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    state: TrainState,
    extra: dict[str, Any],
    maps: torch.nn.Module | None = None,
) -> Path:
    """Write the checkpoint atomically (temporary file, fsync, rename); ``extra``: more JSON metadata;
    ``maps``: the hidden-state maps trained beside the student."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {f"student.{k}": v for k, v in student.state_dict().items()}
    if maps is not None:
        tensors.update({f"maps.{k}": v for k, v in maps.state_dict().items()})
    opt = optimizer.state_dict()
    state_json: dict[str, dict[str, Any]] = {}
    for idx, values in opt["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                state_json.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    if state.order is not None:
        tensors["data.order"] = state.order
    if state.first_order is not None:
        tensors["data.first_order"] = state.first_order
    meta = {
        "version": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "seconds": state.seconds,
        "losses": [list(x) for x in state.losses],
        "window": list(state.window),
        "last_loss": state.last_loss,
        "optimizer": {"param_groups": opt["param_groups"], "state": state_json},
        "scheduler": scheduler.state_dict(),
        **extra,
    }
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(_own_storage(tensors), str(tmp), metadata={"format": "pt", _META_KEY: json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none."""
    from safetensors import SafetensorError, safe_open

    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as err:
        raise ModelpressError(
            f"cannot read the checkpoint {path} ({err})", "delete it to start over"
        ) from err
    if raw is None:
        raise ModelpressError(f"{path} is not a modelpress training checkpoint", "delete it to start over")
    meta = json.loads(raw)
    if meta.get("version") != FORMAT_VERSION:
        raise ModelpressError(
            f"{path} has checkpoint format {meta.get('version')}, this modelpress reads {FORMAT_VERSION}",
            "delete it to start over",
        )
    return Checkpoint(path=path, tensors=tensors, meta=meta)


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from the flattened tensors and the JSON part."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in saved["state"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for group in saved["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])  # JSON has no tuples
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, shared storages (tied weights) copied apart: safetensors refuses aliasing."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out
