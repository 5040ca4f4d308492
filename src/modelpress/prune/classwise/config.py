"""The settings of a class-wise split (the ``prune.classwise`` pass and :func:`classwise_split`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from modelpress.passes import PassConfig
from modelpress.prune.global_ import GlobalConfig
from modelpress.prune.placement import Device

Rule = Literal["concat", "fusion"]

# prune.global settings for sub-models (``prune`` overrides them key by key): small sub-models of a small model
# need exact widths (rounding to 8 undid most of the last iteration's embedding removals on the digits ViT) and
# more, smaller iterations; whole blocks may go (prune.global counts a residual channel's slices inside a removed
# block once since issue 20; before, it over-counted their savings and missed 0.1 by 40%, so blocks were off)
PRUNE_DEFAULTS: dict[str, Any] = {"iterations": 8, "kinds": ["head", "head_dim", "mlp", "embedding", "conv", "block"],
                                  "round_to": {"mlp": 1, "head_dim": 1, "embedding": 1, "conv": 1}}
RULES: tuple[Rule, ...] = ("concat", "fusion")


class ClasswiseConfig(PassConfig):
    """Settings of a class-wise split (the ``prune.classwise`` pass and :func:`classwise_split`)."""

    k: int | None = Field(None, ge=1)  # number of subsets, balanced automatically
    subsets: list[list[int]] | None = None  # or the subsets themselves (class indices)
    ratio: float = Field(0.25, gt=0.0, le=1.0)  # each sub-model keeps this fraction of the full model's params
    saliency: Literal["magnitude", "taylor", "hessian", "obd"] = "hessian"
    prune: dict[str, Any] = Field(default_factory=dict)  # prune.global settings over PRUNE_DEFAULTS
    recover_steps: int = Field(200, ge=0)
    recover_lr: float = Field(5e-4, gt=0)
    recover_data: Literal["subset", "all"] = "subset"  # all: distil the subset's logits on every train sample
    batch_size: int = Field(32, ge=1)
    label_weight: float = Field(0.0, ge=0.0, le=1.0)
    fusion_hidden: int = Field(32, ge=0)
    fusion_steps: int = Field(300, ge=1)
    fusion_lr: float = Field(1e-2, gt=0)
    fusion_data: Literal["calibration", "train"] = "calibration"
    devices: list[dict[str, Any]] = Field(default_factory=list)  # name, memory_mb, target | latency_ms
    reconstruct: bool = True  # prune.global's reconstruct: refit each sub-model's readers of removed units

    @field_validator("prune")
    @classmethod
    def _prune_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = {"ratio", "saliency", "label_weight", "reconstruct"} & set(value)
        if clash:
            raise ValueError(f"set {sorted(clash)} at the top level, not under prune")
        GlobalConfig(**{**PRUNE_DEFAULTS, **value})  # unknown keys and bad values fail here, before anything runs
        return value

    def model_post_init(self, __context: object) -> None:
        if self.k is None and self.subsets is None:
            raise ValueError("give k (balanced subsets) or subsets")
        if self.k is not None and self.subsets is not None and len(self.subsets) != self.k:
            raise ValueError(f"k is {self.k} but {len(self.subsets)} subsets are given")
        for d in self.devices:
            Device.parse(d)
        if self.recover_data == "all" and self.label_weight > 0:
            raise ValueError("recover_data 'all' distils only (other classes' samples have no subset label): "
                             "set label_weight 0")
