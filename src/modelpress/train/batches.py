"""Training batches: a split's samples gathered once, served in a seeded order reshuffled every epoch."""

from __future__ import annotations

import torch

from modelpress.data.sources import DataSplit
from modelpress.errors import ModelpressError

__all__ = ["Samples"]


class Samples:
    """Every sample of a :class:`DataSplit` as one tensor per input (plus ``labels`` when the split has them).

    Text batches padded to different lengths are right-padded with zeros (``attention_mask`` 0) to one
    length; :meth:`batch` trims each training batch back to its longest sequence.
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
