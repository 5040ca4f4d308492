"""Weights mapped from a checkpoint file, dropped from the resident set once a step has read them."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.system import drop_file_pages, file_backed, file_mappings_frozen

__all__ = ["drop_mapped_weights", "drop_tensors", "dropped_after_use", "file_mappings_frozen", "spill_weights", "whole_storage"]


def drop_mapped_weights(module: nn.Module) -> int:
    """Let this process's resident set drop ``module``'s weights that are mapped from a file (Hugging Face's
    ``from_pretrained`` maps model.safetensors): they read the same afterwards (the next read faults them back
    in from the file, usually still in the page cache). A file mapping with any page written since it was mapped
    is skipped whole (see :func:`modelpress.system.drop_file_pages`), so no write is ever lost. Returns the bytes
    dropped: 0 for weights in ordinary memory.

    A run that has read every weight (a trace, a forward over calibration data) otherwise keeps a full copy of
    them resident under its next steps' ONNX Runtime sessions and child processes."""
    return drop_tensors((*module.parameters(), *module.buffers()))


def _spans(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    spans = {}
    for t in tensors:
        if t.numel() and not t.is_meta:
            storage = t.untyped_storage()
            spans[storage.data_ptr()] = storage.nbytes()
    return spans


def drop_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """:func:`drop_mapped_weights` for the given tensors (their whole storages)."""
    return drop_file_pages(_spans(tensors).items())


@contextlib.contextmanager
def dropped_after_use(module: nn.Module) -> Iterator[Callable[[torch.Tensor], None]]:
    """While inside, each submodule's own weights mapped from a file leave the resident set as soon as its
    forward has read them, so a pass over data that reads every weight (the saliency's forwards) holds one
    layer's mapped weights resident at a time, not the model's. Yields ``done(tensor)``, to call where a
    weight's last use of a step is known (its gradient has been taken: the backward read it again). The
    mappings are read once (:func:`file_mappings_frozen`): nothing inside may write a mapped weight in place.
    A model without mapped weights gets no hooks."""
    owners = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if not file_backed(_spans(p for m in owners for p in m.parameters(recurse=False)).items()):
        yield lambda t: None  # the common case (weights in ordinary memory): one read of /proc/self/maps
        return
    with file_mappings_frozen():

        def after(m: nn.Module, _args: Any, _out: Any) -> None:
            drop_tensors(m.parameters(recurse=False))

        def done(t: torch.Tensor) -> None:
            drop_tensors([t])

        handles = [m.register_forward_hook(after) for m in owners]
        try:
            yield done
        finally:
            for h in handles:
                h.remove()


def whole_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous and the whole of its storage (not a view into a larger one): safetensors writes
    such a tensor from its own memory, and a spilled one keeps a file of its own."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def spill_weights(module: nn.Module, folder: str | os.PathLike) -> int:
    """Write each of ``module``'s tensors that live in ordinary memory to a file of its own in ``folder`` and put
    a private mapping of that file in its place: the module computes the same, and :func:`drop_mapped_weights`
    can then let the weights leave the resident set while other work needs the memory (a compressed model
    waiting, whole, while ONNX Runtime sessions of it and of the original are timed). Each tensor stays the
    whole of its storage (saving it copies nothing). Returns the bytes spilled; 0 (nothing changed) off Linux,
    where mapped pages cannot be dropped. The files must stay while the module uses them (on Linux deleting
    them is safe: a mapping keeps its data); a write into a spilled tensor stays in memory, the file untouched.
    """
    if platform.system() != "Linux":
        return 0
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}  # storage -> (owner, attribute, is a parameter)
    tensors: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for attr, t in (*owner._parameters.items(), *owner._buffers.items()):
            if t is None or not t.numel() or t.is_meta or t.device.type != "cpu":
                continue
            if not whole_storage(t):
                continue  # a view into a larger storage: left in memory
            key = t.untyped_storage().data_ptr()
            tensors.setdefault(key, t.detach())
            holders.setdefault(key, []).append((owner, attr, attr in owner._parameters))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spilled = 0
    with torch.no_grad():
        for i, (key, t) in enumerate(tensors.items()):
            path = folder / f"{i}.bin"
            nbytes = t.numel() * t.element_size()
            with open(path, "wb") as f:
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # 0-d included
            view = torch.empty(0, dtype=t.dtype).set_(
                torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes), 0, t.shape, t.stride())
            for owner, attr, is_param in holders[key]:
                if is_param:
                    owner._parameters[attr].data = view
                else:
                    owner._buffers[attr] = view
            spilled += nbytes
    return spilled
