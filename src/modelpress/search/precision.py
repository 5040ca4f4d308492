"""The measured per-layer, per-precision latency table that predicted latency of mixed precision uses.

One global INT8/float factor credits every Linear with the same saving; on a CPU the MLP's wide matmuls gain
from INT8 kernels while a small projection may not gain at all (or lose, to its Quantize/Dequantize pair).
So the table is measured per **layer kind** (a Linear's path inside its block: ``attention.q_proj``,
``mlp.fc1``...) and precision, leave-one-out: the full model in that precision except that kind (float in every
block), built as candidates are (the quantize pass through the registry, exported as deployed) and timed
interleaved with the full float and full lower-precision models in the same rounds. A kind's saving is the
share of the full float latency that putting it back in the lower precision removes, per block. Leave-one-out,
not one kind alone: one INT8 kind among float neighbours pays its own Quantize/Dequantize pair (on the digits
ViT each kind alone measured 0.90-1.02x while full INT8 measured 1.09x), which a neighbourhood in INT8 shares.
The savings are scaled so that all kinds together give the measured full lower-precision model (``scale``:
their interaction). When the two disagree in sign (on MiniLM at batch 1 every leave-one-out variant measured
faster than full INT8 in the same rounds, so the kinds summed to a loss while full INT8 saved 43%), the
leave-one-out deltas say nothing usable: full INT8's measured saving is then shared among the kinds in
proportion to their weights (their matmul work), and the note says so, rather than predicting full INT8 slower
than float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpress.errors import ModelpressError

__all__ = ["PrecisionTable", "build_precision_table", "layer_kinds", "measure_precision_table", "precision_variants"]


@dataclass
class PrecisionTable:
    """``savings[kind][precision]``: the share of the full float model's latency one block's layer of that
    kind saves in that precision (measured over all blocks, divided by their number, times ``scale``).
    ``full[precision]``: the measured share the full model in that precision saves; ``speedups``: the
    measured speedups over full float of every timed variant."""

    savings: dict[str, dict[str, float]]
    blocks: int
    full: dict[str, float]
    scale: dict[str, float]
    speedups: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)

    def saving(self, kind: str, precision: str) -> float:
        try:
            return self.savings[kind][precision]
        except KeyError as exc:
            raise ModelpressError(f"the precision table has no {precision} latency for layers {kind!r}",
                                  "measure it again for this search space") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionTable:
        return cls(**d)


def layer_kinds(space: Any) -> dict[str, list[str]]:
    """Layer kind (path inside its block) -> the precision layers of that kind, over ``space``'s blocks."""
    out: dict[str, list[str]] = {}
    for name in space.precision_layers:
        block = next(b.path for b in space.blocks if name.startswith(b.path + "."))
        out.setdefault(name[len(block) + 1:], []).append(name)
    return out


def precision_variants(space: Any) -> dict[str, dict[str, Any]]:
    """The configs the table times: ``{kind}@{precision}`` (the model in that precision but that kind, float in
    every block) and ``full-{precision}``, for every precision of the space but float."""
    out: dict[str, dict[str, Any]] = {}
    for p in space.precisions:
        if p == "float":
            continue
        full = space.largest(p)
        for kind, names in layer_kinds(space).items():
            out[f"{kind}@{p}"] = {**full, "precision": {**full["precision"], **dict.fromkeys(names, "float")}}
        out[f"full-{p}"] = full
    return out


def measure_precision_table(space: Any, speedups: dict[str, float], measured: dict[str, Any] | None = None,
                            weights: dict[str, float] | None = None) -> PrecisionTable:
    """The table from measured ``speedups`` over full float of :func:`precision_variants`' configs.
    ``weights``: each precision layer's weight count, for the fallback when the kinds and the full model
    disagree in sign (without it their savings are left unscaled)."""
    kinds = layer_kinds(space)
    blocks = len({next(b.path for b in space.blocks if n.startswith(b.path + ".")) for n in space.precision_layers})
    savings: dict[str, dict[str, float]] = {k: {} for k in kinds}
    full: dict[str, float] = {}
    scale: dict[str, float] = {}
    notes = dict((measured or {}).get("notes", {}))
    for p in space.precisions:
        if p == "float":
            continue
        t_full = 1.0 / speedups[f"full-{p}"]  # latency as a share of full float's
        raw = {k: 1.0 / speedups[f"{k}@{p}"] - t_full for k in kinds}
        full[p] = 1.0 - t_full
        total = sum(raw.values())
        scale[p] = full[p] / total if abs(total) > 1e-9 and full[p] * total > 0 else 1.0
        if scale[p] == 1.0 and abs(total - full[p]) > 1e-9:
            per_kind = {k: sum(weights.get(n, 0.0) for n in names) for k, names in kinds.items()} if weights else {}
            if sum(per_kind.values()) > 0:
                raw = {k: full[p] * per_kind[k] / sum(per_kind.values()) for k in kinds}
                notes[p] = (f"the kinds' leave-one-out savings ({total:.4f} of full float) and full {p}'s "
                            f"({full[p]:.4f}) disagree in sign: full {p}'s saving is shared by weight count")
            else:
                notes[p] = (f"the kinds' savings ({total:.4f} of full float) and full {p}'s ({full[p]:.4f}) disagree "
                            "in sign: not scaled")
        for k, v in raw.items():
            savings[k][p] = v * scale[p] / max(blocks, 1)
    return PrecisionTable(savings, blocks, full, scale, dict(speedups), {**(measured or {}), "notes": notes})


def build_precision_table(space: Any, export: Callable[[dict[str, Any], Path], Path], folder: Path,
                          measure: Callable[[dict[str, Path]], dict[str, dict[str, float]]],
                          measured: dict[str, Any] | None = None,
                          weights: dict[str, float] | None = None) -> PrecisionTable:
    """Export :func:`precision_variants` into ``folder`` with ``export(config, path)``, time them with
    ``measure(name -> ONNX)`` (interleaved with full float; returns per name ``vs_float``) and build the table."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {n: export(c, folder / f"{n.replace('@', '-')}.onnx") for n, c in precision_variants(space).items()}
    times = measure(files)
    return measure_precision_table(space, {n: float(times[n]["vs_float"]) for n in files}, measured, weights)
