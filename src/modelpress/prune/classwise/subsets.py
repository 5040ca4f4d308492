"""Which classes each sub-model answers for, and the classifier rows that select them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from modelpress.errors import ModelpressError
from modelpress.graph import Group, ModelGraph


def balanced_subsets(num_classes: int, k: int) -> list[list[int]]:
    """``k`` contiguous runs of ``range(num_classes)`` whose sizes differ by at most one."""
    if k < 1:
        raise ModelpressError(f"K must be at least 1, got {k}", "give k >= 1")
    if k > num_classes:
        raise ModelpressError(f"K = {k} is more than the model's {num_classes} classes",
                              f"give k <= {num_classes} (each sub-model needs at least one class)")
    return [[int(c) for c in part] for part in np.array_split(np.arange(num_classes), k)]


def check_subsets(subsets: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """Given subsets, sorted; a short error unless they cover every class exactly once."""
    out = [sorted(int(c) for c in s) for s in subsets]
    if len(out) > num_classes:
        raise ModelpressError(f"K = {len(out)} is more than the model's {num_classes} classes",
                              f"give at most {num_classes} subsets")
    if any(not s for s in out):
        raise ModelpressError("a class subset is empty", "give every subset at least one class")
    flat = [c for s in out for c in s]
    bad = sorted({c for c in flat if not 0 <= c < num_classes})
    if bad:
        raise ModelpressError(f"classes {bad} are outside the model's 0..{num_classes - 1}", "fix the subsets")
    twice = sorted({c for c in flat if flat.count(c) > 1})
    missing = sorted(set(range(num_classes)) - set(flat))
    if twice or missing:
        raise ModelpressError(
            f"the subsets must cover every class exactly once (twice: {twice}, missing: {missing})",
            "list each class index in exactly one subset",
        )
    return out


def classifier_group(graph: ModelGraph, task: Any) -> tuple[Group, int]:
    """The group of the classifier's output rows and the number of classes; ModelpressError if none."""
    if task is None or getattr(task, "name", "") != "classification":
        name = getattr(task, "name", None) or "none"
        raise ModelpressError(f"class-wise pruning needs a classifier, and the task is {name!r}",
                              "use it on an image or text classifier (task: classification)")
    out = graph.forward(graph.example_inputs(2))
    if out.ndim != 2:
        raise ModelpressError(
            f"{graph.name} has no classifier: its output has shape {tuple(out.shape)}, not [batch, classes]",
            "use class-wise pruning on a model that ends in a classification layer",
        )
    num_classes = int(out.shape[1])
    found = [g for g in graph.groups
             if g.kind == "channel" and g.meta.get("at_output") and not g.meta.get("fixed") and g.size == num_classes]
    if len(found) != 1:
        raise ModelpressError(
            f"{graph.name} has no classifier layer whose rows modelpress can select "
            f"({len(found)} candidate output groups of {num_classes} units)",
            "use class-wise pruning on a model that ends in a linear classifier",
        )
    return found[0], num_classes


def restricted(graph: ModelGraph, group: Group, classes: list[int]) -> ModelGraph:
    """A copy whose classifier keeps only ``classes``' rows: it outputs ``logits[:, classes]`` exactly."""
    out = graph.copy()
    drop = sorted(set(range(group.size)) - set(classes))
    out.remove_many([(group.name, drop)], force=True)
    out.name = f"{graph.name}-classes-{'_'.join(map(str, classes))}"
    return out
