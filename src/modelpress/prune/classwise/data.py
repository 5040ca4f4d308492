"""Per-subset data: each sample's class, and a split restricted to a subset's samples (re-batched)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modelpress.data.sources import DataSplit, TaskData
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph


@torch.no_grad()
def logits(module: nn.Module, names: list[str], split: DataSplit) -> np.ndarray:
    """The module's outputs on every batch of ``split``, in sample order (torch, no gradients)."""
    from modelpress.data import torch_runner

    run = torch_runner(module, names)
    return np.concatenate([run(b) for b in split.numpy_batches()], axis=0)


def sample_classes(split: DataSplit, reference: ModelGraph) -> np.ndarray:
    """Each sample's class: its label, or the reference's prediction when the split has no labels."""
    labels = split.all_labels()
    if labels is not None:
        return labels.astype(np.int64)
    return logits(reference.module, list(reference.input_spec.names), split).argmax(axis=1)


def _rows(split: DataSplit) -> list[tuple[int, int]]:
    return [(b, i) for b, batch in enumerate(split.batches) for i in range(int(next(iter(batch.values())).shape[0]))]


def _take_samples(split: DataSplit, keep: np.ndarray, labels: np.ndarray, batch_size: int) -> DataSplit:
    """The samples ``keep`` (indices in sample order) with ``labels`` (one per kept sample), rebatched to
    ``batch_size`` when every batch has one shape per input, else filtered batch by batch."""
    keys = list(split.batches[0])
    same = all(len({tuple(b[k].shape[1:]) for b in split.batches}) == 1 for k in keys)
    if same:
        full = {k: torch.cat([b[k] for b in split.batches]) for k in keys}
        idx = torch.as_tensor(keep, dtype=torch.long)
        lab = torch.as_tensor(labels, dtype=torch.long)
        batches, labs = [], []
        for s in range(0, len(keep), batch_size):
            batches.append({k: v[idx[s:s + batch_size]].contiguous() for k, v in full.items()})
            labs.append(lab[s:s + batch_size])
        return DataSplit(batches, labs)
    rows = _rows(split)
    by_batch: dict[int, list[tuple[int, int]]] = {}
    for j, i in enumerate(keep):
        b, r = rows[int(i)]
        by_batch.setdefault(b, []).append((r, j))
    batches, labs = [], []
    for b, pairs in sorted(by_batch.items()):
        r = torch.as_tensor([p[0] for p in pairs])
        batches.append({k: v[r] for k, v in split.batches[b].items()})
        labs.append(torch.as_tensor(labels[[p[1] for p in pairs]], dtype=torch.long))
    return DataSplit(batches, labs)


def subset_split(split: DataSplit, classes_of: np.ndarray, subset: list[int], batch_size: int) -> DataSplit:
    """The samples of ``split`` whose class is in ``subset``, labelled with their index within it."""
    local = {c: i for i, c in enumerate(subset)}
    keep = np.flatnonzero(np.isin(classes_of, subset))
    return _take_samples(split, keep, np.array([local[int(c)] for c in classes_of[keep]], dtype=np.int64), batch_size)


def train_split_of(data: TaskData) -> DataSplit:
    """The data recovery trains on: the train split, or the calibration split when there is none."""
    try:
        return data.train
    except ModelpressError:
        return data.calibration
