"""The LINAS loop (Lightweight Iterative NAS, Intel Labs / DyNAS-T): measure a batch of candidates for real,
fit a light predictor per expensive objective (ridge, SVR or gradient boosting, chosen by cross-validated
error), run many NSGA-II generations (pymoo) on the predictors plus the cheap objectives, measure the
predicted front's next batch for real, and repeat within a budget of real evaluations.

The state (every measured candidate with its predicted values) is written as JSON after every batch; a
resumed run reloads it and continues. Every random draw is seeded by (seed, batch), so a resumed search
ends where an uninterrupted one does when the measurements repeat.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.bench.runner import write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.progress import QUIET, Reporter
from modelpress.search.space import config_key, dedupe

STATE_FORMAT = 1
Config = dict[str, Any]


@dataclass
class Problem:
    """What the loop searches: integer genes, their decoding, the objectives (all minimized here as
    ``sign * value``; ``maximize`` lists those to maximize) and the cheap ones computed without measuring."""

    lower: np.ndarray
    upper: np.ndarray
    decode: Callable[[np.ndarray], Config]
    objectives: list[str]
    maximize: list[str]
    cheap: Callable[[Config], dict[str, float]]
    cheap_objectives: list[str]
    encode: Callable[[Config], np.ndarray]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # predictions are clipped to them

    def vector(self, values: dict[str, float]) -> np.ndarray:
        return np.array([-values[o] if o in self.maximize else values[o] for o in self.objectives], dtype=float)

    @property
    def expensive(self) -> list[str]:
        """The objectives that are measured (and predicted between batches)."""
        return [o for o in self.objectives if o not in self.cheap_objectives]

    def features(self, rows: np.ndarray | list) -> np.ndarray:
        """Gene rows scaled to [0, 1] per gene: what the predictors are fitted and queried on."""
        return (np.atleast_2d(np.asarray(rows, dtype=float)) - self.lower) / np.maximum(self.upper - self.lower, 1)


# ------------------------------------------------------------------------------------------- predictors


def _candidates(seed: int) -> dict[str, Any]:
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    return {
        "ridge": Ridge(alpha=1.0),
        "svr": make_pipeline(StandardScaler(), SVR(C=10.0, epsilon=0.01)),
        "gbm": GradientBoostingRegressor(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=seed),
    }


@dataclass
class Predictor:
    """One fitted regressor for one objective, chosen among ridge / SVR / GBM by cross-validated MAE."""

    name: str
    model: Any
    cv_error: float
    scale: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(features) * self.scale


def fit_predictor(features: np.ndarray, y: np.ndarray, seed: int = 0) -> Predictor:
    """Fit each candidate model, keep the one with the lowest K-fold mean absolute error (K <= 5)."""
    from sklearn.model_selection import KFold, cross_val_score

    scale = float(np.std(y)) or 1.0
    target = y / scale
    folds = min(5, len(y))
    best: tuple[float, str] | None = None
    models = _candidates(seed)
    for name, model in models.items():
        if folds >= 2:
            cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
            err = -float(np.mean(cross_val_score(model, features, target, cv=cv, scoring="neg_mean_absolute_error")))
        else:
            err = 0.0
        if best is None or err < best[0] - 1e-12:
            best = (err, name)
    assert best is not None
    model = models[best[1]].fit(features, target)
    return Predictor(best[1], model, best[0] * scale, scale)


def fit_predictors(problem: Problem, records: list[dict[str, Any]], seed: int = 0) -> dict[str, Predictor]:
    """One predictor per expensive objective, fitted on measured ``records`` (their gene rows ``x``)."""
    feats = problem.features([r["x"] for r in records])
    return {o: fit_predictor(feats, np.array([r["objectives"][o] for r in records], dtype=float), seed)
            for o in problem.expensive}


def predict(problem: Problem, predictors: dict[str, Predictor], rows: np.ndarray | list) -> list[dict[str, float]]:
    """The predicted expensive objectives of gene ``rows``, one dict per row."""
    if not len(rows):
        return []
    feats = problem.features(rows)
    values = {o: np.clip(p.predict(feats), *problem.ranges.get(o, (-np.inf, np.inf))) for o, p in predictors.items()}
    return [{o: float(v[i]) for o, v in values.items()} for i in range(len(feats))]


def kendall_tau(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float | None:
    """Kendall's tau-b between two sequences (None with fewer than 3 pairs or no variation)."""
    if len(a) < 3:
        return None
    from scipy.stats import kendalltau

    tau = kendalltau(np.asarray(a), np.asarray(b)).statistic
    return None if tau is None or np.isnan(tau) else float(tau)


# ---------------------------------------------------------------------------------------------- NSGA-II


def nsga2(problem: Problem, predictors: dict[str, Predictor], *, seed: int, pop_size: int = 48,
          generations: int = 40) -> np.ndarray:
    """NSGA-II (pymoo) over integer genes on predicted + cheap objectives; returns the final population
    sorted front first (rank, then crowding), as gene rows."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem as PymooProblem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling
        from pymoo.optimize import minimize
    except ImportError as exc:
        raise ModelpressError(f"search needs pymoo ({exc})", "pip install 'modelpress[search]'") from exc

    lo, up = problem.lower, problem.upper

    def objective_matrix(x: np.ndarray) -> np.ndarray:
        x = np.asarray(np.round(x), dtype=np.int64)
        rows = []
        for row, predicted in zip(x, predict(problem, predictors, x), strict=True):
            values = problem.cheap(problem.decode(row)) if problem.cheap_objectives else {}
            values.update(predicted)
            rows.append(problem.vector(values))
        return np.array(rows)

    class _P(PymooProblem):
        def __init__(self) -> None:
            super().__init__(n_var=len(lo), n_obj=len(problem.objectives), xl=lo, xu=up, vtype=int)

        def _evaluate(self, x: np.ndarray, out: dict, *args: Any, **kwargs: Any) -> None:
            out["F"] = objective_matrix(x)

    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    res = minimize(_P(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    pop = res.pop
    x = np.asarray(np.round(pop.get("X")), dtype=np.int64)
    rank = pop.get("rank")
    crowd = pop.get("crowding")
    rank = np.zeros(len(x)) if rank is None else np.asarray(rank, dtype=float)
    crowd = np.zeros(len(x)) if crowd is None else np.nan_to_num(np.asarray(crowd, dtype=float), posinf=1e9)
    order = np.lexsort((-crowd, rank))
    return x[order]


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Non-dominated rows of a minimization matrix."""
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if not keep[i]:
            continue
        dominated = np.all(points <= points[i], axis=1) & np.any(points < points[i], axis=1)
        if dominated.any():
            keep[i] = False
    return keep


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume (pymoo) of minimization points against reference point ``ref``."""
    from pymoo.indicators.hv import HV

    pts = np.asarray(points, dtype=float)
    pts = pts[np.all(pts < ref, axis=1)]
    if not len(pts):
        return 0.0
    return float(HV(ref_point=np.asarray(ref, dtype=float))(pts))


# --------------------------------------------------------------------------------------------- the loop


def load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state at ``path`` (None if absent); a state of another problem is a ModelpressError."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelpressError(f"cannot read the search state {path}: {exc}", "start a new run (another -o)") from exc
    saved = state.get("fingerprint")
    if saved != fingerprint:
        differ = sorted(k for k in set(saved or {}) | set(fingerprint) if (saved or {}).get(k) != fingerprint.get(k))
        raise ModelpressError(
            f"{path.parent} holds a search of another model, space or settings (differs in: {', '.join(differ)})",
            "resume with the same model and options, or give another -o",
        )
    return state


def check_budget(budget: int, batch_size: int) -> None:
    """A batch of at least one candidate, and a budget of at least one batch."""
    if batch_size < 1:
        raise ModelpressError(f"batch size must be at least 1, got {batch_size}")
    if budget < batch_size:
        raise ModelpressError(f"a budget of {budget} evaluations is smaller than one batch ({batch_size})",
                              f"give --budget {batch_size} or more, or a smaller batch")


def run_linas(
    problem: Problem,
    evaluate_batch: Callable[[list[Config]], list[dict[str, float]]],
    state_path: Path,
    *,
    budget: int,
    batch_size: int,
    seed: int = 0,
    fingerprint: dict[str, Any] | None = None,
    initial: list[Config] | None = None,
    pop_size: int = 48,
    generations: int = 40,
    max_batches: int | None = None,
    resume: bool = False,
    reporter: Reporter = QUIET,
) -> dict[str, Any]:
    """Run (or resume) the loop until ``budget`` real evaluations; returns the state (also at ``state_path``).

    ``initial``: configs measured first (e.g. the largest and smallest). ``max_batches`` stops after that
    many batches in this call (the state stays resumable)."""
    check_budget(budget, batch_size)
    fingerprint = {**(fingerprint or {}), "seed": seed, "batch_size": batch_size, "objectives": problem.objectives}
    state = load_state(state_path, fingerprint) if resume else None
    if state is None:
        if state_path.exists() and not resume:
            raise ModelpressError(f"{state_path} exists: a search was run there", "pass --resume, or another -o")
        state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "budget": budget, "records": [], "batches": []}
    state["budget"] = budget
    seen = {config_key(r["config"]) for r in state["records"]}
    expensive = problem.expensive
    lo, up = problem.lower, problem.upper
    ran = 0
    while len(state["records"]) < budget and (max_batches is None or ran < max_batches):
        b = len(state["batches"])
        want = min(batch_size, budget - len(state["records"]))
        rng = np.random.default_rng([seed, b])
        predicted: list[dict[str, float] | None]
        info: dict[str, Any] = {"batch": b}
        if b == 0:
            picks = dedupe([*(initial or [])], seen)[:want]
            tries = 0
            while len(picks) < want and tries < 1000:
                picks += dedupe([problem.decode(rng.integers(lo, up + 1))], seen)
                tries += 1
            predicted = [None] * len(picks)
        else:
            predictors = fit_predictors(problem, state["records"], seed)
            info["predictors"] = {o: {"model": p.name, "cv_mae": p.cv_error} for o, p in predictors.items()}
            with reporter.step(f"batch {b}: NSGA-II on predictors ({generations} generations)"):
                pop = nsga2(problem, predictors, seed=seed * 1009 + b, pop_size=pop_size, generations=generations)
            picks_x = _spread([row for row in pop], problem, want, seen)
            tries = 0
            while len(picks_x) < want and tries < 1000:  # a small space may hold fewer unseen configs
                row = rng.integers(lo, up + 1)
                if dedupe([problem.decode(row)], seen):
                    picks_x.append(row)
                tries += 1
            picks = [problem.decode(row) for row in picks_x]
            predicted = predict(problem, predictors, picks_x)
        if not picks:
            reporter.log("the space has no candidate left to measure")
            break
        with reporter.step(f"batch {b}: measuring {len(picks)} candidates"):
            results = evaluate_batch(picks)
        for config, values, pred in zip(picks, results, predicted, strict=True):
            state["records"].append({
                "config": config, "x": [int(v) for v in problem.encode(config)], "objectives": values,
                "predicted": pred,
                "batch": b,
            })
        taus = {}
        for o in expensive:
            pairs = [(r["predicted"][o], r["objectives"][o]) for r in state["records"][-len(picks):] if r["predicted"]]
            if pairs:
                taus[o] = kendall_tau([p for p, _ in pairs], [m for _, m in pairs])
        info["kendall_tau"] = taus
        info["evaluated"] = len(picks)
        state["batches"].append(info)
        write_json_atomic(state_path, state)
        ran += 1
    return state


def _spread(pop: list[np.ndarray], problem: Problem, want: int, seen: set[str]) -> list[np.ndarray]:
    """Up to ``want`` unseen rows of the population, front first."""
    fresh, keys = [], set()
    for row in pop:
        k = config_key(problem.decode(row))
        if k not in seen and k not in keys:
            keys.add(k)
            fresh.append(row)
    fresh = fresh[:want]  # the population is sorted front first, most isolated first: a spread front
    for row in fresh:
        seen.add(config_key(problem.decode(row)))
    return fresh
