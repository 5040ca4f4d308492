"""The LINAS loop on a toy problem with a known front: predictors + NSGA-II find it, and an interrupted
search resumes to the same result as an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pymoo")
pytest.importorskip("sklearn")

from modelpress.errors import ModelpressError  # noqa: E402
from modelpress.search.linas import Problem, hypervolume, pareto_mask, run_linas  # noqa: E402

N = 10  # gene values 0..N


def _toy() -> Problem:
    """ZDT1 on an integer grid: f1 = x0 / N; g = 1 + 9 * mean(x1..) / N; f2 = g (1 - sqrt(f1 / g)).
    The front is x1.. = 0 (f2 = 1 - sqrt(f1)); f2 is the expensive objective, f1 the cheap one."""

    def values(config: dict) -> dict[str, float]:
        x = np.asarray(config["x"], dtype=float)
        f1 = x[0] / N
        g = 1 + 9 * x[1:].mean() / N
        return {"f1": float(f1), "f2": float(g * (1 - np.sqrt(f1 / g)))}

    return Problem(
        lower=np.zeros(4, dtype=np.int64), upper=np.full(4, N, dtype=np.int64),
        decode=lambda x: {"x": [int(v) for v in x]}, objectives=["f1", "f2"], maximize=[],
        cheap=lambda c: {"f1": values(c)["f1"]}, cheap_objectives=["f1"],
        encode=lambda c: np.asarray(c["x"]),
    ), values


def _batch(values):  # noqa: ANN001, ANN202
    return lambda configs: [values(c) for c in configs]


def _front(state: dict, problem: Problem) -> np.ndarray:
    pts = np.array([problem.vector(r["objectives"]) for r in state["records"]])
    return pts[pareto_mask(pts)]


def test_predictors_and_nsga2_find_the_known_front(tmp_path) -> None:  # noqa: ANN001
    problem, values = _toy()
    state = run_linas(problem, _batch(values), tmp_path / "state.json", budget=40, batch_size=10, seed=0,
                      generations=25, pop_size=40)
    assert len(state["records"]) == 40
    front = _front(state, problem)
    true_front = np.array([[i / N, 1 - np.sqrt(i / N)] for i in range(N + 1)])
    ref = np.array([1.1, 11.0])
    hv, hv_true = hypervolume(front, ref), hypervolume(true_front, ref)
    # random search with the same 40 evaluations for comparison
    rng = np.random.default_rng(0)
    rand = np.array([problem.vector(values({"x": rng.integers(0, N + 1, 4)})) for _ in range(40)])
    hv_random = hypervolume(rand[pareto_mask(rand)], ref)
    assert hv > 0.97 * hv_true, (hv, hv_true)
    assert hv > hv_random
    # the later batches sit on or next to the true front (x1.. = 0; random draws: 4 in 1331 within one step)
    later = [r for r in state["records"] if r["batch"] >= 2]
    near = sum(1 for r in later if sum(r["config"]["x"][1:]) <= 1)
    assert near >= 0.75 * len(later), [r["config"]["x"] for r in later]
    assert all(b.get("predictors") for b in state["batches"][1:])


def test_interrupted_search_resumes_to_the_same_result(tmp_path) -> None:  # noqa: ANN001
    problem, values = _toy()
    kw = dict(budget=30, batch_size=10, seed=3, generations=10, pop_size=24)
    full = run_linas(problem, _batch(values), tmp_path / "a" / "state.json", **kw)
    part = run_linas(problem, _batch(values), tmp_path / "b" / "state.json", max_batches=1, **kw)
    assert len(part["records"]) == 10
    with pytest.raises(ModelpressError, match="resume"):
        run_linas(problem, _batch(values), tmp_path / "b" / "state.json", **kw)
    resumed = run_linas(problem, _batch(values), tmp_path / "b" / "state.json", resume=True, **kw)
    assert [r["config"] for r in resumed["records"]] == [r["config"] for r in full["records"]]
    saved = json.loads((tmp_path / "b" / "state.json").read_text())
    assert saved["records"] == json.loads((tmp_path / "a" / "state.json").read_text())["records"]
    # another seed is another search: refused, the state kept
    with pytest.raises(ModelpressError, match="another model, space or settings"):
        run_linas(problem, _batch(values), tmp_path / "b" / "state.json", resume=True, **{**kw, "seed": 4})
    assert json.loads((tmp_path / "b" / "state.json").read_text())["records"] == saved["records"]


def test_budget_smaller_than_a_batch_is_refused(tmp_path) -> None:  # noqa: ANN001
    problem, values = _toy()
    with pytest.raises(ModelpressError, match="smaller than one batch"):
        run_linas(problem, _batch(values), tmp_path / "s.json", budget=5, batch_size=10)
    assert not (tmp_path / "s.json").exists()


def test_a_space_smaller_than_the_budget_ends_when_every_config_is_measured(tmp_path) -> None:  # noqa: ANN001
    """Five configs in all, a budget of eight: the loop measures each once and stops (no endless refill)."""
    problem = Problem(
        lower=np.zeros(1, dtype=np.int64), upper=np.full(1, 4, dtype=np.int64),
        decode=lambda x: {"x": [int(v) for v in x]}, objectives=["f1", "f2"], maximize=[],
        cheap=lambda c: {"f1": c["x"][0] / 4}, cheap_objectives=["f1"], encode=lambda c: np.asarray(c["x"]),
    )
    state = run_linas(problem, _batch(lambda c: {"f1": c["x"][0] / 4, "f2": 1 - c["x"][0] / 4}),
                      tmp_path / "state.json", budget=8, batch_size=2, seed=0, generations=2, pop_size=4)
    assert sorted(r["config"]["x"][0] for r in state["records"]) == [0, 1, 2, 3, 4]
