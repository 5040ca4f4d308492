"""Transport plans between the units of two models, solved by the POT library (``pot`` on the index).

``couple(cost)`` returns a coupling ``T`` [n_src, n_tgt] with uniform marginals (``1/n_src`` per row,
``1/n_tgt`` per column): exact optimal transport (``ot.emd``, a permutation scaled by ``1/n`` for square
costs) for ``alignment="hard"``, entropic transport (``ot.sinkhorn``, regularisation ``reg``
relative to the largest cost) for ``alignment="soft"``. Rectangular costs give rectangular plans: a unit
of the wider side is spread over (or merged into) several units of the narrower one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from modelpress.errors import ModelpressError

ALIGNMENTS = ("hard", "soft")


def pot() -> Any:
    """The ``ot`` module, or a short error naming the extra that installs it."""
    try:
        import ot
    except ImportError as exc:
        raise ModelpressError(
            "optimal-transport fusion needs the POT library, which is not installed",
            'pip install "modelpress[fuse]"  (or: pip install pot)',
        ) from exc
    return ot


def couple(cost: np.ndarray, alignment: str = "hard", reg: float = 0.01, max_iter: int = 20000) -> np.ndarray:
    """The transport plan for ``cost`` [n_src, n_tgt] with uniform marginals (see the module); a short error when
    the solver stopped before its plan had those marginals (Sinkhorn after ``max_iter`` iterations)."""
    if alignment not in ALIGNMENTS:
        raise ModelpressError(f"unknown alignment {alignment!r}", f"use one of {', '.join(ALIGNMENTS)}")
    ot = pot()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n, k = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    scale = float(np.abs(cost).max()) or 1.0
    if alignment == "hard":
        plan = ot.emd(a, b, cost / scale, numItermax=1_000_000)
    else:
        method = "sinkhorn" if reg >= 0.005 else "sinkhorn_stabilized"  # plain scaling underflows below that
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns when the stopping threshold is not reached: checked below
            plan = ot.sinkhorn(a, b, cost / scale, reg, method=method, numItermax=max_iter, stopThr=1e-9)
    plan = np.asarray(plan, dtype=np.float64)
    check_marginals(plan, alignment, reg)
    return plan


def marginal_error(plan: np.ndarray) -> float:
    """The largest relative deviation of ``plan``'s row and column sums from uniform marginals (inf for NaN)."""
    n, k = plan.shape
    rows, cols = plan.sum(1) * n, plan.sum(0) * k
    error = max(float(np.abs(rows - 1).max()), float(np.abs(cols - 1).max()))
    return error if np.isfinite(error) else float("inf")


def check_marginals(plan: np.ndarray, alignment: str, reg: float, tol: float = 1e-3) -> None:
    """A short error when a plan's marginals are off by more than ``tol`` (relative): a plan that did not
    converge would move some units' mass twice and others' not at all."""
    error = marginal_error(plan)
    if error <= tol:
        return
    if alignment == "soft":
        raise ModelpressError(f"the Sinkhorn plan did not converge (marginals off by {error:.2g}, reg={reg:g})",
                              "raise reg (e.g. reg=0.05) or use alignment=hard")
    raise ModelpressError(f"the exact transport plan did not converge (marginals off by {error:.2g})",
                          "use alignment=soft, or report it with the models' sizes")


def cost_value(cost: np.ndarray) -> float:
    """The optimal transport cost (exact) of ``cost`` with uniform marginals."""
    ot = pot()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n, k = cost.shape
    return float(ot.emd2(np.full(n, 1.0 / n), np.full(k, 1.0 / k), cost, numItermax=1_000_000))


def distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``x`` and of ``y`` (``ot.dist``)."""
    return np.asarray(pot().dist(np.asarray(x, np.float64), np.asarray(y, np.float64)), dtype=np.float64)
