"""The least-squares refit of one layer after some of its inputs were removed, from second-moment statistics.

A layer computes ``y = W x + b`` (a convolution in im2col form: ``x`` one unfolded patch). After a structural
edit the pruned model feeds it ``x'`` (the kept columns, computed by the pruned upstream layers), and we want its
output to stay what the ORIGINAL layer gave on the original input ``x``. Over calibration rows ``X`` (original
inputs, all columns) and ``X'`` (pruned inputs, kept columns, same rows) the refit is

    V, c = argmin || X' V^T + 1 c^T - (X W^T + 1 b^T) ||^2

which needs only ``G' = X'^T X'``, the cross term ``C = X'^T X`` and the column sums of both (float64, summed
over rows; never the rows themselves). With the bias free (``intercept=True``: FLAP's bias compensation, An et
al., AAAI 2024, generalised) the problem is solved on mean-centred statistics and the bias is the intercept,
``c = b + W mean(x) - V mean(x')``; with the bias fixed, ``V^T = (G' + lambda I)^-1 C W^T``.

When the pruned layer sees exactly the original's kept columns (``X' = X[:, K]``, the layer-independent case)
``G' = G[K, K]``, ``C = G[K, :]`` and the refit is the structured OBS update of ZipLM / SlimGPT,
``V = W[:, K] + W[:, R] G[R, K] G[K, K]^-1`` (:func:`obs_update`, :func:`stats_from_gram`).

Damping: ``lambda = damp * mean(diag(G'))`` (``damp`` 0.01 by default, GPTQ's), added before a Cholesky solve;
if the factorisation fails the damping grows tenfold (three times), then a pseudo-inverse solve is used. A
refit that is not finite, or that does not lower the output error on the calibration rows, is not applied:
the layer keeps its pruned weight and the result says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

DEFAULT_DAMP = 0.01

__all__ = ["DEFAULT_DAMP", "PairStats", "Refit", "obs_update", "output_error", "refit", "stats_from_gram"]


@dataclass
class PairStats:
    """Second moments of one layer's pruned inputs ``X'`` (kept columns) and original inputs ``X`` over the
    same rows, float64: ``gram = X'^T X'`` [k, k], ``cross = X'^T X`` [k, n], ``gram_orig = X^T X`` [n, n],
    column sums ``sum_pruned`` [k] and ``sum_orig`` [n], and the row count."""

    gram: torch.Tensor
    cross: torch.Tensor
    gram_orig: torch.Tensor
    sum_pruned: torch.Tensor
    sum_orig: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, kept: int, full: int, device: torch.device | str = "cpu") -> PairStats:
        z = {"dtype": torch.float64, "device": device}
        return cls(torch.zeros(kept, kept, **z), torch.zeros(kept, full, **z), torch.zeros(full, full, **z),
                   torch.zeros(kept, **z), torch.zeros(full, **z))

    def add(self, pruned_rows: torch.Tensor, orig_rows: torch.Tensor) -> None:
        """Sum one batch's rows in (``pruned_rows`` [r, k], ``orig_rows`` [r, n], the same r rows)."""
        xp, xo = pruned_rows.double(), orig_rows.double()
        self.gram += xp.t() @ xp
        self.cross += xp.t() @ xo
        self.gram_orig += xo.t() @ xo
        self.sum_pruned += xp.sum(0)
        self.sum_orig += xo.sum(0)
        self.rows += int(xp.shape[0])


def stats_from_gram(gram: torch.Tensor, kept: torch.Tensor, col_sum: torch.Tensor | None = None,
                    rows: int = 0) -> PairStats:
    """The statistics of the layer-independent case, where the pruned layer reads the original's own kept
    columns (``X' = X[:, kept]``): everything follows from one Gram ``X^T X`` (and its column sums)."""
    g = gram.double()
    kept = torch.as_tensor(kept, dtype=torch.long)
    s = torch.zeros(g.shape[0], dtype=torch.float64) if col_sum is None else col_sum.double()
    return PairStats(g[kept][:, kept].clone(), g[kept].clone(), g.clone(), s[kept].clone(), s.clone(), rows)


@dataclass
class Refit:
    """A refit layer: ``weight`` [out, k] and ``bias`` [out] (None: unchanged / none), the output error
    ``||X' V^T + c - (X W^T + b)||^2`` before (the pruned weights as they were) and after, both relative to the
    original output's energy ``||X W^T + b||^2``, whether the refit was applied, and notes (damping raised,
    too few rows, not applied and why)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error_before: float
    error_after: float
    applied: bool
    notes: list[str] = field(default_factory=list)


def output_error(stats: PairStats, weight: torch.Tensor, bias: torch.Tensor | None,
                 new_weight: torch.Tensor, new_bias: torch.Tensor | None) -> tuple[float, float]:
    """``(||X' V^T + 1 c^T - X W^T - 1 b^T||^2, ||X W^T + 1 b^T||^2)`` from the statistics alone (float64):
    ``W, b`` the original layer (rows already restricted to the kept outputs), ``V, c`` the pruned one."""
    w, v = weight.double(), new_weight.double()
    out = w.shape[0]
    b = torch.zeros(out, dtype=torch.float64) if bias is None else bias.double()
    c = torch.zeros(out, dtype=torch.float64) if new_bias is None else new_bias.double()
    n = float(stats.rows)
    d = c - b
    err = (torch.einsum("oi,ij,oj->", v, stats.gram, v) - 2 * torch.einsum("oi,ij,oj->", v, stats.cross, w)
           + torch.einsum("oi,ij,oj->", w, stats.gram_orig, w)
           + 2 * d @ (v @ stats.sum_pruned - w @ stats.sum_orig) + n * d @ d)
    energy = torch.einsum("oi,ij,oj->", w, stats.gram_orig, w) + 2 * b @ (w @ stats.sum_orig) + n * b @ b
    return max(0.0, float(err)), float(energy)


def _solve_spd(a: torch.Tensor, rhs: torch.Tensor, damp: float, notes: list[str]) -> torch.Tensor:
    """``(A + lambda I)^-1 rhs`` for a symmetric positive semi-definite ``A``: Cholesky with
    ``lambda = damp * mean(diag(A))``, the damping raised tenfold up to three times when it fails, then a
    pseudo-inverse."""
    k = a.shape[0]
    scale = float(torch.diag(a).mean()) if k else 0.0
    scale = scale if scale > 0 and torch.isfinite(torch.tensor(scale)) else 1.0
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    d = damp
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(a + d * scale * eye)
        if int(info) == 0:
            if attempt:
                notes.append(f"damping raised to {d:g} (Cholesky failed at {damp:g})")
            return torch.cholesky_solve(rhs, chol)
        d = max(d * 10.0, 1e-6)
    notes.append("Cholesky failed at every damping: pseudo-inverse solve")
    return torch.linalg.pinv(a + damp * scale * eye, hermitian=True) @ rhs


def refit(stats: PairStats, weight: torch.Tensor, bias: torch.Tensor | None, current_weight: torch.Tensor,
          current_bias: torch.Tensor | None, *, damp: float = DEFAULT_DAMP, intercept: bool = True,
          name: str = "layer") -> Refit:
    """Refit a pruned layer to the original layer's outputs (see the module docstring).

    ``weight`` [out, n] / ``bias``: the ORIGINAL layer, rows restricted to the outputs the pruned layer keeps;
    ``current_weight`` [out, k] / ``current_bias``: the pruned layer as it is (the error before, and what is kept
    when the refit is not applied). ``intercept``: refit the bias too (bias compensation; the layer must have
    one or the caller must give it one: ``current_bias`` not None). ``damp``: relative damping (default 0.01).
    Warns (``warnings``) when there are fewer calibration rows than kept columns.
    """
    notes: list[str] = []
    k = stats.gram.shape[0]
    fit_bias = intercept and current_bias is not None
    if intercept and current_bias is None:
        notes.append("no bias: the mean shift is not compensated")
    need = k + (1 if fit_bias else 0)
    if stats.rows < need:
        msg = f"{name}: {stats.rows} calibration rows for {need} unknowns per output: the refit is damped, not exact"
        notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    w = weight.detach().double().cpu()
    b = None if bias is None else bias.detach().double().cpu()
    cur_w = current_weight.detach().double().cpu()
    cur_b = None if current_bias is None else current_bias.detach().double().cpu()
    s = _cpu(stats)
    n = max(1, s.rows)
    if fit_bias:
        mp, mo = s.sum_pruned / n, s.sum_orig / n
        a = s.gram - n * torch.outer(mp, mp)
        cross = s.cross - n * torch.outer(mp, mo)
    else:
        a, cross = s.gram, s.cross
    v = _solve_spd(a, cross @ w.t(), damp, notes).t()
    c = cur_b
    if fit_bias:
        b0 = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b
        c = b0 + w @ mo - v @ mp
    before, energy = output_error(s, w, b, cur_w, cur_b)
    finite = bool(torch.isfinite(v).all()) and (c is None or bool(torch.isfinite(c).all()))
    after = output_error(s, w, b, v, c)[0] if finite else float("inf")
    rel = 1.0 / energy if energy > 0 else 1.0
    if not finite:
        notes.append("refit not finite: weights left as they were")
    elif not after < before:
        notes.append(f"refit does not lower the output error ({after * rel:.3g} >= {before * rel:.3g}): not applied")
    applied = finite and after < before
    if not applied:
        return Refit(current_weight.detach().clone(), None if current_bias is None else current_bias.detach().clone(),
                     before * rel, before * rel, False, notes)
    dtype = current_weight.dtype
    return Refit(v.to(dtype), None if c is None else c.to(dtype), before * rel, after * rel, True, notes)


def obs_update(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """The structured OBS update (ZipLM, SlimGPT): the kept columns absorb the removed ones through the
    input Gram, ``W[:, K] + W[:, R] G[R, K] (G[K, K] + lambda I)^-1`` with ``lambda = damp * mean(diag(G[K, K]))``
    (float64; returns [out, k] in the weight's dtype). Equals :func:`refit` on :func:`stats_from_gram`
    without intercept at ``damp = 0``."""
    w, g = weight.detach().double(), gram.detach().double()
    kept = torch.as_tensor(kept, dtype=torch.long)
    mask = torch.ones(g.shape[0], dtype=torch.bool)
    mask[kept] = False
    removed = torch.nonzero(mask).flatten()
    notes: list[str] = []
    # (G_KK + lambda)^-1 G_KR W_R^T, transposed: W_R G_RK (G_KK + lambda)^-1
    fix = _solve_spd(g[kept][:, kept], g[kept][:, removed] @ w[:, removed].t(), damp, notes).t()
    return (w[:, kept] + fix).to(weight.dtype)


def _cpu(stats: PairStats) -> PairStats:
    return PairStats(stats.gram.cpu(), stats.cross.cpu(), stats.gram_orig.cpu(), stats.sum_pruned.cpu(),
                     stats.sum_orig.cpu(), stats.rows)
