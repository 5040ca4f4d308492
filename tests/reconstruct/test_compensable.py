"""The share of a unit's removal the least-squares refit cannot undo (reconstruct.compensable), against numpy."""

from __future__ import annotations

import numpy as np
import torch

from modelpress.data import load_data, probes
from modelpress.graph import ModelGraph
from modelpress.reconstruct.compensable import compensable_fractions, remaining_fractions


def _lstsq_fraction(x: np.ndarray, w: np.ndarray, removed: list[int]) -> float:
    """Output error of removing ``removed`` columns after refitting the others and the bias (numpy lstsq), over the
    error with the bias alone compensating."""
    kept = [c for c in range(x.shape[1]) if c not in removed]
    y = x @ w.T
    design = np.concatenate([x[:, kept], np.ones((x.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    fit = float(((design @ coef - y) ** 2).sum())
    xs = x[:, removed] - x[:, removed].mean(axis=0)
    raw = float(((xs @ w[:, removed].T) ** 2).sum())
    return fit / raw


def test_fractions_equal_the_numpy_least_squares_refit() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)  # correlated, non-zero means
    x[:, 5] = 0.9 * x[:, 0] - 0.5 * x[:, 2] + 0.05 * rng.normal(size=400)  # almost a copy of others: refit undoes it
    w = rng.normal(size=(3, 6))
    gram, mean = torch.as_tensor(x.T @ x / len(x)), torch.as_tensor(x.mean(axis=0))
    sets = [[0], [3], [5], [1, 4]]
    got = remaining_fractions(torch.as_tensor(w), gram, mean, sets, damp=0.0)
    want = [_lstsq_fraction(x, w, s) for s in sets]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[2] < 0.05 < got[1]  # the near-copy is nearly free once refit; an independent column is not


def test_fractions_of_the_digits_vit_use_the_readers_inputs(zoo_vit) -> None:  # noqa: ANN001
    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, batch_size=32, n_calibration=96, n_evaluation=None)
    groups = [g for g in graph.groups if g.kind in ("head", "mlp")]
    got = compensable_fractions(graph.module, groups, data.calibration.batches, damp=0.0,
                                input_names=graph.input_spec.names)
    assert set(got) == {g.name for g in groups}
    for g in groups:
        assert got[g.name].shape == (g.size,) and np.all((got[g.name] > 0) & (got[g.name] <= 1))
    # one MLP group against numpy on the rows its second Linear reads
    g = next(g for g in groups if g.kind == "mlp")
    param, axis = next(s for s in g.meta["input_slots"] if s[0].endswith("weight") and s[1] == 1)
    layer = param.rpartition(".")[0]
    names = set(graph.input_spec.names)
    rows = probes.collect(graph.module, [{k: v for k, v in b.items() if k in names} for b in data.calibration.batches],
                          [layer], stats=("inputs",), label_key=None)[layer].inputs.double().numpy()
    w = dict(graph.module.named_parameters())[param].detach().double().numpy()
    want = [_lstsq_fraction(rows, w, np.asarray(u[(param, axis)]).reshape(-1).tolist()) for u in g.units[:16]]
    np.testing.assert_allclose(got[g.name][:16], want, rtol=1e-4)


def test_global_rank_refit_reranks_by_what_the_refit_cannot_undo(zoo_vit, tmp_path) -> None:  # noqa: ANN001
    from modelpress.data.tasks import ClassificationTask
    from modelpress.passes import Context, registered_passes

    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, batch_size=32, n_calibration=96, n_evaluation=None)
    config = {"saliency": "hessian", "target": "params", "ratio": 0.5, "iterations": 1, "kinds": ["head", "mlp"],
              "reconstruct": False, "batches": 3}
    widths = {}
    for flag in (False, True):
        ctx = Context(workdir=tmp_path / str(flag), task=ClassificationTask(), data=data, reference=graph, seed=0)
        widths[flag] = registered_passes()["prune.global"]({**config, "rank_refit": flag}).apply(graph, ctx).metrics["widths"]
    # the same target, another choice: the ranking sees what the refit would undo
    assert widths[True] != widths[False], widths
