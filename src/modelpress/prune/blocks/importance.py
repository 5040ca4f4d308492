"""Block importance on calibration data: Macro Influence (FuseGPT), ShortGPT's Block Influence, one-shot KL, and
the Hessian block saliency of ``prune.global``.

Every criterion scores the removable blocks of a :class:`~modelpress.graph.ModelGraph` (``graph.blocks``);
a low score means the block is safe to remove. A block is removed for scoring by *bypassing* it (a forward
hook makes it return its input hidden states), which is what deleting a residual block computes, without
copying the model once per block.

- **Macro Influence** (``mi``, FuseGPT): the information lost at the model's final hidden state (the output
  of its last block) when the block is removed, ``1 - cos(h_final, h_final without the block)`` per token,
  averaged, against the model as it is now. The pass re-scores after every removal (the dynamic variant).
  This is the measure of the authors' code (``full_importance_eval`` in JarvisPei/FuseGPT's
  ``fuse_utils.py``: mean cosine of the last decoder layer's outputs, the most similar block removed first).
- **Block Influence** (``block-influence``, ShortGPT): ``1 - cos(input, output)`` of the block's hidden
  states, averaged over tokens.
- **One-shot KL** (``kl``): the task's distillation loss at the model's output (KL of the next-token / class
  distributions, the embedding task's fidelity loss) of removing each block alone, scored once.
- **Hessian** (``hessian``): ``prune.global``'s block saliency (the diagonal-Fisher OBD saliency of the heads
  and MLP units that empty the block, summed), scored once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from modelpress.graph import ModelGraph

Importance = Literal["mi", "block-influence", "kl", "hessian"]
IMPORTANCES: tuple[str, ...] = ("mi", "block-influence", "kl", "hessian")


def hidden_of(out: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a block's output (a tensor, the first item of a tuple, or ``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    value = getattr(out, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else None


def input_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden-state input of a block call: its first positional tensor, else ``hidden_states``, else any tensor."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _replace_hidden(out: Any, x: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    if hasattr(out, "last_hidden_state"):
        out.last_hidden_state = x
        return out
    return x


@contextmanager
def bypassed(module: nn.Module, path: str) -> Iterator[None]:
    """Within the context, block ``path`` of ``module`` returns its input hidden states (as if deleted)."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        x = input_of(args, kwargs)
        return out if x is None else _replace_hidden(out, x)

    handle = module.get_submodule(path).register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _inputs(graph: ModelGraph, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: batch[n] for n in graph.input_spec.names if n in batch}


@torch.no_grad()
def output_change(graph: ModelGraph, batches: Sequence[dict[str, torch.Tensor]], task: Any,
                  paths: Sequence[str]) -> dict[str, float]:
    """For each block path: the task's distillation loss of the model with that block removed against the model
    as it is, averaged over ``batches`` (the one-shot KL baseline)."""
    teacher = [graph.forward(_inputs(graph, b)) for b in batches]
    scores: dict[str, float] = {}
    for path in paths:
        total = 0.0
        with bypassed(graph.module, path):
            for b, t in zip(batches, teacher, strict=True):
                s = graph.forward(_inputs(graph, b))
                total += float(task.loss(s.float(), t.float(), b))
        scores[path] = max(total / max(len(batches), 1), 0.0)
    return scores


@torch.no_grad()
def block_influence(graph: ModelGraph, batches: Sequence[dict[str, torch.Tensor]],
                    paths: Sequence[str]) -> dict[str, float]:
    """ShortGPT's Block Influence: ``1 - cos(x_in, x_out)`` per token (last dimension), averaged."""
    sums = dict.fromkeys(paths, 0.0)
    counts = dict.fromkeys(paths, 0)
    handles = []

    def make(path: str):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x, y = input_of(args, kwargs), hidden_of(out)
            if x is None or y is None or x.shape != y.shape:
                return
            cos = torch.nn.functional.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            sums[path] += float((1.0 - cos).sum())
            counts[path] += int(cos.numel())

        return hook

    for p in paths:
        handles.append(graph.module.get_submodule(p).register_forward_hook(make(p), with_kwargs=True))
    try:
        for b in batches:
            graph.forward(_inputs(graph, b))
    finally:
        for h in handles:
            h.remove()
    return {p: sums[p] / max(counts[p], 1) for p in paths}


class _Stop(Exception):  # noqa: N818 - control flow: the wanted hidden state is known, the rest is not run
    pass


def hidden_at(module: nn.Module, path: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden state at the output of block ``path`` (the model is run up to that block only). Hooks on
    the block registered before this call (e.g. :func:`bypassed`) apply first."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        seen.append(hidden_of(out))
        raise _Stop

    handle = module.get_submodule(path).register_forward_hook(hook)
    try:
        module(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen or seen[0] is None:
        raise RuntimeError(f"block {path} was not run or returned no hidden state")
    return seen[0]


def _token_cosine(a: torch.Tensor, b: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Sum over tokens (padding excluded when the batch has a 2-D attention mask) of ``1 - cos`` along the last
    dimension, in float64 (identical states give 0 exactly, not rounding noise), and the token count."""
    dist = 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == dist.shape:
        keep = mask.bool()
        return float(dist[keep].sum()), int(keep.sum())
    return float(dist.sum()), int(dist.numel())


@torch.no_grad()
def macro_influence(graph: ModelGraph, batches: Sequence[dict[str, torch.Tensor]],
                    paths: Sequence[str]) -> dict[str, float]:
    """FuseGPT's Macro Influence of each block path: ``1 - cos`` between the model's final hidden state (the
    output of its last block, before any final norm or head) as it is and with that block removed, per token,
    averaged over ``batches``. A block whose removal changes nothing downstream scores 0."""
    last = graph.blocks[-1].path
    inputs = [_inputs(graph, b) for b in batches]
    full = [hidden_at(graph.module, last, x) for x in inputs]
    scores: dict[str, float] = {}
    for path in paths:
        total, count = 0.0, 0
        with bypassed(graph.module, path):  # registered first: runs before hidden_at's hook on the same block
            for b, x, ref in zip(batches, inputs, full, strict=True):
                s, n = _token_cosine(hidden_at(graph.module, last, x), ref, b)
                total, count = total + s, count + n
        scores[path] = max(total / max(count, 1), 0.0)
    return scores


def hessian_saliency(graph: ModelGraph, batches: Sequence[dict[str, torch.Tensor]], task: Any,
                     paths: Sequence[str], seed: int = 0) -> dict[str, float]:
    """``prune.global``'s Hessian block saliency of each block path (its own scoring, reused)."""
    from modelpress.prune.global_ import block_saliency

    return block_saliency(graph, list(paths), list(batches), task, seed=seed)


def block_scores(graph: ModelGraph, importance: Importance, batches: Sequence[dict[str, torch.Tensor]],
                 task: Any, paths: Sequence[str] | None = None, seed: int = 0) -> dict[str, float]:
    """Score ``paths`` (default: every removable block) with ``importance``; lower is safer to remove."""
    paths = list(paths) if paths is not None else [b.path for b in graph.blocks if b.removable]
    if importance == "block-influence":
        return block_influence(graph, batches, paths)
    if importance == "mi":
        return macro_influence(graph, batches, paths)
    if importance == "kl":
        return output_change(graph, batches, task, paths)
    if importance == "hessian":
        return hessian_saliency(graph, batches, task, paths, seed)
    raise ValueError(f"unknown block importance {importance!r}; choose one of {IMPORTANCES}")
