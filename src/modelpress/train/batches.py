"""Training batches: a split's samples gathered once, served in a seeded order reshuffled every epoch."""

from __future__ import annotations

import torch

from modelpress.data.sources import DataSplit
from modelpress.errors import ModelpressError

__all__ = ["GROUP_BATCHES", "Samples"]

GROUP_BATCHES = 50  # batches per length-sorted chunk when batches are grouped by length (as HF's megabatches)


class Samples:
    """Every sample of a :class:`DataSplit` as one tensor per input (plus ``labels`` when the split has them).

    Text batches padded to different lengths are right-padded with zeros (``attention_mask`` 0) to one
    length; :meth:`batch` trims each training batch back to its longest sequence, and :meth:`epoch_order` can
    put sequences of similar length together so that little is padded.
    """

    def __init__(self, split: DataSplit) -> None:
        if not split.batches:
            raise ModelpressError("the training data is empty", "give a train split with samples")
        keys = list(split.batches[0])
        if any(list(b) != keys for b in split.batches):
            raise ModelpressError(
                "the training batches have different inputs", "give every batch the same keys"
            )
        self.tensors = {k: _concat([b[k] for b in split.batches], k, "attention_mask" in keys) for k in keys}
        self.labels = None if split.labels is None else torch.cat([lab.reshape(-1) for lab in split.labels])
        self.n = int(next(iter(self.tensors.values())).shape[0])
        if self.labels is not None and len(self.labels) != self.n:
            raise ModelpressError(
                f"the training data has {len(self.labels)} labels for {self.n} samples", "give one per sample"
            )

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> torch.Tensor | None:
        """Every sample's length (its last attention-mask token + 1), or None for data without a 2-D mask."""
        mask = self.tensors.get("attention_mask")
        if mask is None or mask.ndim != 2:
            return None
        used = mask.ne(0)
        positions = torch.arange(1, mask.shape[1] + 1).expand_as(used)
        return (positions * used).amax(dim=1)

    def epoch_order(self, generator: torch.Generator, batch_size: int, group_by_length: bool = False) -> torch.Tensor:
        """One epoch's sample order: a seeded random permutation; with ``group_by_length`` (text only), each run
        of ``GROUP_BATCHES`` batches of it is sorted by length and cut into batches, and the full batches are
        shuffled (the one short batch, if any, stays last), so a batch pads to about its own samples' length
        and the order stays random from batch to batch. Without grouping it draws exactly what it always did."""
        order = torch.randperm(self.n, generator=generator)
        lengths = self.lengths if group_by_length else None
        if lengths is None:
            return order
        chunk = batch_size * GROUP_BATCHES
        batches: list[torch.Tensor] = []
        for start in range(0, self.n, chunk):
            part = order[start : start + chunk]
            part = part[torch.sort(lengths[part], descending=True, stable=True).indices]
            batches.extend(part.split(batch_size))
        tail = [batches.pop()] if len(batches[-1]) < batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return torch.cat(shuffled + tail)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at ``index`` (plus ``"labels"``), padding columns no sample uses removed."""
        out = {k: v[index] for k, v in self.tensors.items()}
        mask = out.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            used = mask.ne(0).any(dim=0).nonzero()
            length = int(used.max()) + 1 if len(used) else 1
            if length < mask.shape[1]:
                out = {k: v[:, :length] if v.shape[:2] == mask.shape else v for k, v in out.items()}
        if self.labels is not None:
            out["labels"] = self.labels[index]
        return out


def _concat(parts: list[torch.Tensor], name: str, has_mask: bool) -> torch.Tensor:
    """One tensor of every sample, with plain row-major strides: a [N, 1, H, W] tensor may otherwise carry
    channels-last strides (size-1 dimension), and convolutions then take another, not bit-identical, path."""
    return _concat_samples(parts, name, has_mask).clone(memory_format=torch.contiguous_format)


def _concat_samples(parts: list[torch.Tensor], name: str, has_mask: bool) -> torch.Tensor:
    if len({tuple(p.shape[1:]) for p in parts}) == 1:
        return torch.cat(parts)
    if not has_mask or any(p.ndim != 2 for p in parts):
        raise ModelpressError(
            f"the training batches' {name!r} differ in shape and there is no attention_mask to pad them with",
            "give batches of one shape",
        )
    length = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, length - p.shape[1])) for p in parts])
