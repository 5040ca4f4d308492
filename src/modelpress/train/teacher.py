"""The teacher's side of distillation: its primary output and matched hidden states for a training batch,
from the live model or from a cache filled once and reused every epoch.

The cache holds, per training sample, the teacher's primary output and the hidden states of the matched
blocks, in memory, trimmed to the sample's own length (text: up to its last attention-mask token), in
float32 or float16 (``auto``: float32 when every sample fits the budget in float32, else float16). Memory is
bounded by ``budget_bytes``: the samples are taken in the order the first epoch visits them until the
budget is spent; the rest are run live every time they come round.

Every sample's cached value is computed on a canonical batch: the eligible samples of the first-epoch batch
it came in, so a run resumed from a checkpoint (whose cache starts empty) recomputes exactly the values an
uninterrupted run stored, and the trained weights are bit-identical. In the first epoch the canonical batch is
the training batch itself, so a float32 cache gives the live teacher's values exactly; later epochs differ from
the live teacher only by the padding of the batch they run in (attention to masked padding: float rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph.inputs import primary_output
from modelpress.graph.run import call_module
from modelpress.train.batches import Samples
from modelpress.train.distill import capture

__all__ = ["CachedTeacher", "LiveTeacher", "Targets"]

Targets = tuple[torch.Tensor, list[torch.Tensor]]
"""The teacher's primary output and its matched hidden states (in the order of the pairs)."""


class LiveTeacher:
    """Runs the teacher (eval mode, no gradients) on a batch; returns its targets on ``device``."""

    def __init__(self, module: nn.Module, names: list[str], paths: list[str], device: torch.device) -> None:
        self.module, self.names, self.paths, self.device = module, names, paths, device
        param = next(module.parameters(), None)
        self.teacher_device = device if param is None else param.device
        self.calls = 0  # batches run (the cache's savings are counted in these)
        self.samples_run = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> Targets:
        inputs = {k: v.to(self.teacher_device) for k, v in batch.items()}
        with torch.no_grad(), capture(self.module, self.paths) as found:
            out = primary_output(call_module(self.module, inputs, self.names))
        missing = [p for p in self.paths if p not in found]
        if missing:
            raise ModelpressError(
                f"hidden-state distillation: the teacher's blocks {missing} did not run", "match blocks that run"
            )
        self.calls += 1
        self.samples_run += int(next(iter(inputs.values())).shape[0])
        return out.to(self.device), [found[p].to(self.device) for p in self.paths]


class CachedTeacher:
    """The teacher's targets per training sample, filled on first use and reused every epoch (see the module
    text). ``first_order``: the first epoch's sample order; ``batch_size``: the training batch size."""

    def __init__(
        self,
        live: LiveTeacher,
        samples: Samples,
        first_order: torch.Tensor,
        batch_size: int,
        *,
        dtype: str = "auto",
        budget_bytes: int,
    ) -> None:
        self.live, self.samples, self.batch_size = live, samples, batch_size
        self.first_order = first_order
        n = len(samples)
        self.position = torch.empty(n, dtype=torch.long)
        self.position[first_order] = torch.arange(n)
        mask = samples.tensors.get("attention_mask")
        self.mask_key = "attention_mask" if mask is not None and mask.ndim == 2 else None
        if self.mask_key is not None:
            used = mask.ne(0)
            cols = torch.arange(mask.shape[1]).expand_as(mask)
            self.lengths = torch.where(used, cols + 1, torch.zeros_like(cols)).amax(dim=1).clamp_min(1)
        else:
            self.lengths = torch.ones(n, dtype=torch.long)
        self.layout = self._probe()  # per target: (per token?, values per token or per sample, live dtype)
        live.calls = live.samples_run = 0
        per_token = sum(size for tok, size, _ in self.layout if tok)
        per_sample = sum(size for tok, size, _ in self.layout if not tok)
        values = self.lengths * per_token + per_sample  # values each sample stores
        if dtype == "auto":
            dtype = "float32" if int(values.sum()) * 4 <= budget_bytes else "float16"
        self.dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
        item = torch.empty((), dtype=self.dtype).element_size()
        spent = torch.cumsum(values[first_order] * item, 0)
        self.eligible = torch.zeros(n, dtype=torch.bool)
        self.eligible[first_order[spent <= budget_bytes]] = True
        self.store: dict[int, list[torch.Tensor]] = {}
        self.bytes = 0

    def describe(self) -> str:
        """One line: how much of the data the cache holds, in which dtype."""
        k = int(self.eligible.sum())
        return f"teacher cache: {k} of {len(self.samples)} samples in {str(self.dtype).replace('torch.', '')}"

    def _probe(self) -> list[tuple[bool, int, torch.dtype]]:
        """Which targets are per token (they follow the batch's length) and their sizes, from one sample run
        at its own length and one column shorter (longer only for a one-token sample: a window that already
        fills the model's positions, e.g. GPT-2's ``n_positions``, has no room for another column)."""
        one = self.samples.batch(self.first_order[:1])
        a = self.live(one)
        if self.mask_key is None:
            return [(False, t[0].numel(), t.dtype) for t in [a[0], *a[1]]]
        length = one[self.mask_key].shape[1]
        other = length - 1 if length > 1 else 2

        def resized(v: torch.Tensor) -> torch.Tensor:
            return v[:, :other] if other < length else torch.nn.functional.pad(v, (0, other - length))

        b = self.live({k: resized(v) if v.ndim == 2 and v.shape[1] == length else v for k, v in one.items()})
        layout = []
        for ta, tb in zip([a[0], *a[1]], [b[0], *b[1]], strict=True):
            tok = ta.ndim >= 2 and ta.shape[1] == length and tb.shape[1] == other
            layout.append((tok, ta[0, 0].numel() if tok else ta[0].numel(), ta.dtype))
        return layout

    def __call__(self, index: torch.Tensor, batch: dict[str, torch.Tensor]) -> Targets:
        """The targets of the training batch of samples ``index`` (``batch``: those samples, trimmed)."""
        eligible = self.eligible[index]
        for k in sorted({int(self.position[i]) // self.batch_size for i in index[eligible].tolist()
                         if int(i) not in self.store}):
            self._fill(k)
        length = batch[self.mask_key].shape[1] if self.mask_key is not None else None
        live_rows = (~eligible).nonzero().flatten()
        live = self.live(self.samples.batch(index[live_rows])) if len(live_rows) else None
        targets = []
        for j, (tok, _, dtype) in enumerate(self.layout):
            ref = self.store[int(index[eligible][0])][j] if bool(eligible.any()) else None
            shape_rest = (ref.shape[1:] if tok else ref.shape) if ref is not None else None
            if live is not None:
                lt = live[0] if j == 0 else live[1][j - 1]
                shape_rest = lt.shape[2:] if tok else lt.shape[1:]
            shape = (len(index), length, *shape_rest) if tok else (len(index), *shape_rest)
            out = torch.zeros(shape, dtype=dtype)
            for row in eligible.nonzero().flatten().tolist():
                value = self.store[int(index[row])][j]
                if tok:
                    out[row, : value.shape[0]] = value
                else:
                    out[row] = value
            if live is not None:
                lt = (live[0] if j == 0 else live[1][j - 1]).cpu()
                if tok:
                    out[live_rows, : lt.shape[1]] = lt.to(dtype)
                else:
                    out[live_rows] = lt.to(dtype)
            targets.append(out.to(self.live.device))
        return targets[0], targets[1:]

    def _fill(self, k: int) -> None:
        """Run the teacher on the eligible samples of the first epoch's batch ``k`` and store them."""
        ids = self.first_order[k * self.batch_size : (k + 1) * self.batch_size]
        self._store_batch(ids[self.eligible[ids]])

    def _store_batch(self, ids: torch.Tensor) -> None:
        """Run the teacher on samples ``ids`` as one batch and store the targets of those not stored yet."""
        out, hidden = self.live(self.samples.batch(ids))
        for row, i in enumerate(ids.tolist()):
            if i in self.store:
                continue
            length = int(self.lengths[i])
            kept = []
            for (tok, _, _), t in zip(self.layout, [out, *hidden], strict=True):
                value = t[row, :length] if tok else t[row]
                stored = value.detach().to("cpu").to(self.dtype, copy=True)
                if self.dtype == torch.float16 and not bool(torch.isfinite(stored).all()):
                    stored = value.detach().to("cpu").float().clone()  # out of float16's range: keep float32
                kept.append(stored)
                self.bytes += stored.numel() * stored.element_size()
            self.store[i] = kept
