"""Torch-vs-ONNX Runtime verification: the one comparison every export (float or QDQ) is checked with.

``torch_reference`` runs the torch model (eval mode, no autograd) on the verification batches and
``compare_onnx`` runs the ONNX file on the same batches in ONNX Runtime (CPU) and measures the largest
absolute error, the error relative to the reference and the smallest per-sample cosine similarity.

Tolerance is relative to the output's scale, plus cosine: the allowed error is ``atol + rtol *
max|reference|`` and the smallest per-sample cosine must reach ``min_cosine``. ``DEFAULT_RTOL`` (1e-4)
leaves outputs of order one (embeddings, logits) checked at about ``atol``, while a large-valued output
that matches (random-weight ``inception_v3`` logits in the thousands, cosine 1.000000) is not refused
for float32 rounding; ``rtol=0`` gives the absolute check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from modelpress.graph.run import as_tensors, run_primary
from modelpress.targets import cpu_session

__all__ = ["DEFAULT_RTOL", "Batch", "Verification", "compare_onnx", "torch_reference"]

DEFAULT_RTOL = 1e-4  # allowed error per unit of the largest |torch output| (float32 rounding over deep nets)

Batch = Mapping[str, np.ndarray] | np.ndarray  # named inputs, or one array for a single-input model


@dataclass
class Verification:
    """ONNX Runtime's outputs against torch's on sample inputs.

    ``max_abs_err``: the largest absolute difference over all outputs; ``cosine``: the smallest per-sample
    cosine similarity of the flattened outputs; ``relative_error``: the largest per-batch
    ``||onnx - torch|| / ||torch||``; ``reference_max``: the largest ``|torch output|`` (what ``rtol``
    scales). ``ok``: ``max_abs_err <= atol + rtol * reference_max`` and ``cosine >= min_cosine``.
    """

    max_abs_err: float
    cosine: float
    ok: bool
    atol: float = 1e-3
    min_cosine: float = 0.9999
    shapes: list[list[int]] = field(default_factory=list)
    relative_error: float = 0.0
    reference_max: float = 0.0
    rtol: float = DEFAULT_RTOL

    @property
    def allowed_error(self) -> float:
        """The largest absolute error that passes: ``atol + rtol * reference_max``."""
        return self.atol + self.rtol * self.reference_max

    def describe(self) -> str:
        allowed = f"{self.atol:g}"
        if self.rtol:
            allowed = f"{self.allowed_error:.3g} = {allowed} + {self.rtol:g} * max|ref|"
        return (
            f"max abs error {self.max_abs_err:.3g} (allowed {allowed}), "
            f"min cosine {self.cosine:.6f} (required {self.min_cosine:g})"
        )


def torch_reference(module: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> list[np.ndarray]:
    """The module's primary output (float32 numpy) on each batch: eval mode, ``torch.inference_mode``,
    inputs cast to the module's dtype and device (see ``modelpress.graph.run``)."""
    like = next(module.parameters(), None)
    outs = []
    for batch in batches:
        feed = batch if isinstance(batch, Mapping) else {names[0]: batch}
        out = run_primary(module, as_tensors(feed, names, like), names, inference=True)
        outs.append(out.float().cpu().numpy())
    return outs


def compare_onnx(
    path: Path | str,
    batches: Sequence[Batch],
    reference: Sequence[np.ndarray],
    *,
    atol: float = 1e-3,
    min_cosine: float = 0.9999,
    rtol: float = DEFAULT_RTOL,
    threads: int | None = None,
) -> Verification:
    """Run the ONNX file on ``batches`` in ONNX Runtime (CPU, ``threads``) and compare with ``reference``.

    A batch feeds the inputs the session declares (a single array feeds its first input). A shape
    mismatch or a non-finite output fails with infinite error and cosine -1.
    """
    sess = cpu_session(path, threads)
    wanted = [i.name for i in sess.get_inputs()]
    max_err, min_cos, rel, ref_max, shapes = 0.0, 1.0, 0.0, 0.0, []
    failed = False
    for batch, ref in zip(batches, reference, strict=True):
        feed = _feed(batch, wanted)
        shapes.append(list(next(iter(feed.values())).shape))
        got = np.asarray(sess.run(None, feed)[0], dtype=np.float64)
        ref64 = np.asarray(ref, dtype=np.float64)
        if got.shape != ref64.shape or not np.all(np.isfinite(got)):
            failed = True
            continue
        if not got.size:
            continue
        diff = got - ref64
        max_err = max(max_err, float(np.max(np.abs(diff))))
        ref_max = max(ref_max, float(np.max(np.abs(ref64))))
        rel = max(rel, float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)))
        g, r = got.reshape(got.shape[0], -1), ref64.reshape(ref64.shape[0], -1)
        denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
        cos = np.where(denom > 0, np.sum(g * r, axis=1) / np.maximum(denom, 1e-300), 1.0)
        min_cos = min(min_cos, float(np.min(cos)))
    if failed:
        return Verification(float("inf"), -1.0, False, atol, min_cosine, shapes, float("inf"), ref_max, rtol)
    ok = max_err <= atol + rtol * ref_max and min_cos >= min_cosine
    return Verification(max_err, min_cos, ok, atol, min_cosine, shapes, rel, ref_max, rtol)


def _feed(batch: Batch, wanted: list[str]) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        return {wanted[0]: np.ascontiguousarray(batch)}
    return {k: np.ascontiguousarray(v) for k, v in batch.items() if k in wanted}
