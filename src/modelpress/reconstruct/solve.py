"""The least-squares refit of one layer after some of its inputs were removed, from second-moment statistics.

A layer computes ``y = W x + b`` (a convolution in im2col form: ``x`` one unfolded patch). After a structural
edit the pruned model feeds it ``x'`` (the kept columns, computed by the pruned upstream layers), and we want its
output to stay what the ORIGINAL layer gave on the original input ``x``: the target ``Y = X W^T + 1 b^T``
(restricted to the outputs the pruned layer keeps). Over calibration rows ``X'`` (pruned inputs) and ``Y``
(the original layer's outputs on the same rows) the refit is

    V, c = argmin || X' V^T + 1 c^T - Y ||^2

which needs only ``G' = X'^T X'``, the cross term ``X'^T Y`` (``= X'^T X W^T + ...``: the cross term between
the pruned and the original inputs, already multiplied by the original weight, so no ``n x n`` Gram of the
original inputs is kept), the column sums of ``X'`` and ``Y`` and ``||Y||^2`` (float64, summed over rows; never
the rows themselves). With the bias free (``intercept=True``: FLAP's bias compensation, An et al., AAAI 2024,
generalised) the problem is solved on mean-centred statistics and the bias is the intercept,
``c = mean(y) - V mean(x')``; with the bias fixed at ``c``, ``V^T = (G' + lambda I)^-1 (X'^T Y - sum(x') c^T)``.

When the pruned layer sees exactly the original's kept columns (``X' = X[:, K]``, the layer-independent case),
everything follows from the original Gram ``G = X^T X`` (:func:`stats_from_gram`) and the refit is the
structured OBS update of ZipLM / SlimGPT, ``V = W[:, K] + W[:, R] G[R, K] G[K, K]^-1`` (:func:`obs_update`).

Damping: ``lambda = damp * mean(diag(G'))`` (``damp`` 0.01 by default, GPTQ's; ``G'`` mean-centred when the
bias is fitted, and the intercept itself is never damped), added before a Cholesky solve;
if the factorisation fails the damping grows tenfold (three times), then a pseudo-inverse solve is used. A
refit that is not finite, or that does not lower the output error on the calibration rows, is not applied:
the layer keeps its pruned weight and the result says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

DEFAULT_DAMP = 0.01


class UnderdeterminedRefit(RuntimeWarning):
    """A weight refit with fewer calibration rows than unknowns per output: damped, not exact. ``need``: the rows
    an exact refit needs."""

    def __init__(self, message: str, need: int = 0) -> None:
        super().__init__(message)
        self.need = need


REFIT_MODES = ("weights", "scales")

__all__ = ["DEFAULT_DAMP", "REFIT_MODES", "PairStats", "Refit", "UnderdeterminedRefit", "obs_update", "output_error",
           "refit", "stats_from_gram"]


@dataclass
class PairStats:
    """Second moments of one layer's pruned inputs ``X'`` [rows, k] and its original outputs ``Y`` [rows, m] over
    the same rows, float64: ``gram = X'^T X'``, ``cross = X'^T Y``, column sums ``sum_pruned`` and
    ``sum_target``, ``energy = ||Y||^2`` and the row count."""

    gram: torch.Tensor
    cross: torch.Tensor
    sum_pruned: torch.Tensor
    sum_target: torch.Tensor
    energy: float = 0.0
    rows: int = 0

    @classmethod
    def zeros(cls, kept: int, outputs: int, device: torch.device | str = "cpu") -> PairStats:
        z = {"dtype": torch.float64, "device": device}
        return cls(torch.zeros(kept, kept, **z), torch.zeros(kept, outputs, **z), torch.zeros(kept, **z),
                   torch.zeros(outputs, **z))

    def add(self, pruned_rows: torch.Tensor, target_rows: torch.Tensor, *, inputs: bool = True) -> None:
        """Sum one batch's rows in (``pruned_rows`` [r, k], ``target_rows`` [r, m], the same r rows).
        ``inputs=False``: the input moments (``gram``, ``sum_pruned``, ``rows``) are shared with another layer's
        statistics that sums them (layers reading one input)."""
        xp, y = pruned_rows.double(), target_rows.double()
        self.cross += xp.t() @ y
        self.sum_target += y.sum(0)
        self.energy += float(y.pow(2).sum())
        if inputs:
            self.gram += xp.t() @ xp
            self.sum_pruned += xp.sum(0)
            self.rows += int(xp.shape[0])


def stats_from_gram(gram: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    col_sum: torch.Tensor | None = None, rows: int = 0) -> PairStats:
    """The statistics of the layer-independent case, where the pruned layer reads the original's own kept
    columns (``X' = X[:, kept]``) and the target is ``Y = X W^T + b``: all from one Gram ``X^T X`` (with its
    column sums and row count when there is a bias)."""
    g, w = gram.double(), weight.detach().double()
    kept = torch.as_tensor(kept, dtype=torch.long)
    s = torch.zeros(g.shape[0], dtype=torch.float64) if col_sum is None else col_sum.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    cross = g[kept] @ w.t() + torch.outer(s[kept], b)
    energy = torch.einsum("oi,ij,oj->", w, g, w) + 2 * b @ (w @ s) + rows * b @ b
    return PairStats(g[kept][:, kept].clone(), cross, s[kept].clone(), w @ s + rows * b, float(energy), rows)


@dataclass
class Refit:
    """A refit layer: ``weight`` [out, k] and ``bias`` [out] (None: none), the output error
    ``||X' V^T + c - Y||^2`` before (the pruned weights as they were) and after, both relative to the
    original output's energy ``||Y||^2``, whether the refit was applied, and notes (damping raised,
    too few rows, not applied and why)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error_before: float
    error_after: float
    applied: bool
    notes: list[str] = field(default_factory=list)


def output_error(stats: PairStats, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``||X' V^T + 1 c^T - Y||^2`` for the pruned layer ``V, c`` (float64), from the statistics alone."""
    v = weight.detach().double().cpu()
    c = torch.zeros(v.shape[0], dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    s = _cpu(stats)
    err = (torch.einsum("oi,ij,oj->", v, s.gram, v) - 2 * torch.einsum("oi,io->", v, s.cross) + s.energy
           + s.rows * c @ c + 2 * c @ (v @ s.sum_pruned) - 2 * c @ s.sum_target)
    return max(0.0, float(err))


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


def refit(stats: PairStats, current_weight: torch.Tensor, current_bias: torch.Tensor | None, *,
          damp: float = DEFAULT_DAMP, intercept: bool = True, name: str = "layer", mode: str = "weights") -> Refit:
    """Refit a pruned layer to the original layer's outputs (see the module docstring).

    ``stats``: the pruned inputs against the original outputs; ``current_weight`` [out, k] / ``current_bias``:
    the pruned layer as it is (the error before, and what is kept when the refit is not applied; a fixed bias
    when not refit). ``intercept``: refit the bias too (bias compensation; the layer must have one:
    ``current_bias`` not None, else it is noted). ``damp``: relative damping (default 0.01). ``mode``:
    ``"weights"`` refits every kept weight (``k`` unknowns per output); ``"scales"`` refits one scale per kept
    input column (Kwon et al. 2022's mask tuning: ``V diag(s)``, ``k`` unknowns for the whole layer, so it
    generalises from few calibration rows). Warns (``warnings``) when there are fewer calibration rows than
    unknowns per output (``"weights"``).
    """
    if mode not in REFIT_MODES:
        raise ValueError(f"mode must be one of {REFIT_MODES}, got {mode!r}")
    notes: list[str] = []
    k = stats.gram.shape[0]
    fit_bias = intercept and current_bias is not None
    if intercept and current_bias is None:
        notes.append("no bias: the mean shift is not compensated")
    need = k + (1 if fit_bias else 0)
    if mode == "weights" and stats.rows < need:
        msg = f"{name}: {stats.rows} calibration rows for {need} unknowns per output: the refit is damped, not exact"
        notes.append(msg)
        warnings.warn(UnderdeterminedRefit(msg, need), stacklevel=2)
    s = _cpu(stats)
    n = max(1, s.rows)
    cur_b = None if current_bias is None else current_bias.detach().double().cpu()
    if fit_bias:
        mp, my = s.sum_pruned / n, s.sum_target / n
        a = s.gram - n * torch.outer(mp, mp)
        rhs = s.cross - n * torch.outer(mp, my)
    else:
        a = s.gram
        rhs = s.cross if cur_b is None else s.cross - torch.outer(s.sum_pruned, cur_b)
    if mode == "scales":
        # min_s ||X' diag(s) V^T - Y||^2: normal equations (G o V^T V) s = rowsum(C o V^T), V the pruned weight;
        # damped toward s = 1 (the layer as it is), not toward 0
        cur = current_weight.detach().double().cpu()
        m = a * (cur.t() @ cur)
        ones = torch.ones(k, 1, dtype=torch.float64)
        step = _solve_spd(m, (rhs * cur.t()).sum(1, keepdim=True) - m @ ones, damp, notes)
        v = cur * (ones + step).flatten()[None, :]
    else:
        v = _solve_spd(a, rhs, damp, notes).t()
    c = my - v @ mp if fit_bias else cur_b
    before = output_error(s, current_weight, current_bias)
    finite = bool(torch.isfinite(v).all()) and (c is None or bool(torch.isfinite(c).all()))
    after = output_error(s, v, c) if finite else float("inf")
    rel = 1.0 / s.energy if s.energy > 0 else 1.0
    if not finite:
        notes.append("refit not finite: weights left as they were")
    elif not after < before - 1e-12 * s.energy:  # rounding-level gains (nothing removed) are not a refit
        notes.append(f"refit does not lower the output error ({after * rel:.3g} >= {before * rel:.3g}): not applied")
    applied = finite and after < before - 1e-12 * s.energy
    if not applied:
        return Refit(current_weight.detach().clone(), None if current_bias is None else current_bias.detach().clone(),
                     before * rel, before * rel, False, notes)
    dtype = current_weight.dtype
    return Refit(v.to(dtype), None if c is None else c.to(dtype), before * rel, after * rel, True, notes)


def obs_update(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """The structured OBS update (ZipLM, SlimGPT): the kept columns absorb the removed ones through the
    input Gram, ``W[:, K] + W[:, R] G[R, K] (G[K, K] + lambda I)^-1`` with ``lambda = damp * mean(diag(G[K, K]))``
    (float64; returns [out, k] in the weight's dtype). Equals :func:`refit` on :func:`stats_from_gram`
    without intercept (and bias) at ``damp = 0``."""
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
    return PairStats(stats.gram.cpu(), stats.cross.cpu(), stats.sum_pruned.cpu(), stats.sum_target.cpu(),
                     stats.energy, stats.rows)
