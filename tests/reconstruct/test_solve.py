"""The one-layer refit: least squares with a cross term, its structured-OBS special case, the error it reports,
its damping and its refusal to make a layer worse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from modelpress.reconstruct.solve import PairStats, obs_update, output_error, refit, stats_from_gram


def _data(rows: int = 200, cols: int = 12, out: int = 5, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) @ mix + 0.5  # correlated, not centred
    w = torch.randn(out, cols, generator=gen, dtype=torch.float64)
    b = torch.randn(out, generator=gen, dtype=torch.float64)
    return x, w, b


def _stats(xp: torch.Tensor, y: torch.Tensor) -> PairStats:
    s = PairStats.zeros(xp.shape[1], y.shape[1])
    for chunk in range(0, xp.shape[0], 64):  # summed batch by batch, as the service does
        s.add(xp[chunk : chunk + 64], y[chunk : chunk + 64])
    return s


def test_refit_equals_numpy_lstsq_with_cross_term_and_intercept() -> None:
    x, w, b = _data()
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    # the pruned model's inputs differ from the original's kept columns (an upstream change)
    xp = x[:, kept] * 1.3 + 0.1 * torch.randn(x.shape[0], len(kept), generator=torch.Generator().manual_seed(1),
                                               dtype=torch.float64)
    y = x @ w.t() + b
    stats = _stats(xp, y)
    fit = refit(stats, w[:, kept], b, damp=0.0, intercept=True)
    design = np.concatenate([xp.numpy(), np.ones((x.shape[0], 1))], axis=1)
    sol, *_ = np.linalg.lstsq(design, y.numpy(), rcond=None)
    np.testing.assert_allclose(fit.weight.numpy(), sol[:-1].T, atol=1e-8)
    np.testing.assert_allclose(fit.bias.numpy(), sol[-1], atol=1e-8)
    # and with the bias held fixed: the same as lstsq on y - b
    fixed = refit(stats, w[:, kept], b, damp=0.0, intercept=False)
    sol2, *_ = np.linalg.lstsq(xp.numpy(), (y - b).numpy(), rcond=None)
    np.testing.assert_allclose(fixed.weight.numpy(), sol2.T, atol=1e-8)
    np.testing.assert_allclose(fixed.bias.numpy(), b.numpy())


def test_reported_error_is_the_output_error_on_the_rows() -> None:
    x, w, b = _data()
    kept = torch.tensor([1, 4, 6, 9])
    xp = x[:, kept]
    y = x @ w.t() + b
    fit = refit(_stats(xp, y), w[:, kept], b, damp=1e-3)
    energy = float((y**2).sum())
    before = float(((xp @ w[:, kept].t() + b - y) ** 2).sum()) / energy
    after = float(((xp @ fit.weight.t() + fit.bias - y) ** 2).sum()) / energy
    assert fit.error_before == pytest.approx(before, rel=1e-9)
    assert fit.error_after == pytest.approx(after, rel=1e-9)
    assert fit.applied and after < 0.8 * before
    # the independent case's statistics, built from the Gram alone, are the same statistics
    from_gram = stats_from_gram(x.t() @ x, kept, w, b, x.sum(0), x.shape[0])
    direct = _stats(xp, y)
    for a, c in ((from_gram.gram, direct.gram), (from_gram.cross, direct.cross),
                 (from_gram.sum_target, direct.sum_target)):
        torch.testing.assert_close(a, c)
    assert from_gram.energy == pytest.approx(direct.energy)


def test_obs_update_is_the_least_squares_of_identical_inputs() -> None:
    x, w, _ = _data()
    kept = torch.tensor([0, 1, 4, 5, 9, 10])
    gram = x.t() @ x
    obs = obs_update(w, gram, kept, damp=0.0)
    ls = refit(stats_from_gram(gram, kept, w, rows=x.shape[0]), w[:, kept], None, damp=0.0, intercept=False)
    np.testing.assert_allclose(obs.numpy(), ls.weight.numpy(), atol=1e-9)
    assert not np.allclose(obs.numpy(), w[:, kept].numpy())  # the removed columns were folded in


def test_nothing_removed_leaves_the_weights_unchanged() -> None:
    x, w, b = _data()
    kept = torch.arange(x.shape[1])
    fit = refit(_stats(x, x @ w.t() + b), w, b, damp=0.01)
    assert not fit.applied and fit.error_before == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(fit.weight, w) and torch.equal(fit.bias, b)
    assert torch.equal(obs_update(w, x.t() @ x, kept, damp=0.01), w)


@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0, 100.0])
def test_refit_never_raises_the_output_error(damp: float) -> None:
    for seed in range(5):
        x, w, b = _data(seed=seed)
        kept = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))[:6].sort().values
        xp = x[:, kept] + 0.3 * torch.randn(x.shape[0], 6, dtype=torch.float64)
        cur = w[:, kept] + 0.01
        stats = _stats(xp, x @ w.t() + b)
        fit = refit(stats, cur, b, damp=damp)
        assert fit.error_after <= fit.error_before
        assert fit.error_before == pytest.approx(output_error(stats, cur, b) / stats.energy)


def test_fewer_rows_than_columns_is_damped_finite_and_warned() -> None:
    x, w, b = _data(rows=4, cols=30)
    kept = torch.arange(0, 30, 2)  # 15 kept columns, 4 rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = refit(_stats(x[:, kept], x @ w.t() + b), w[:, kept], b, damp=0.0)
    assert any("calibration rows" in str(c.message) for c in caught)
    assert torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()
    assert any("rows" in n for n in fit.notes)
    assert fit.applied and fit.error_after < 0.5 * fit.error_before  # damped, still a useful refit
    assert fit.weight.abs().max() < 10 * w.abs().max()  # damping keeps the solution small (no blow-up)


def test_a_non_finite_refit_leaves_the_layer_unchanged() -> None:
    x, w, b = _data()
    kept = torch.tensor([0, 1, 2])
    stats = _stats(x[:, kept], x @ w.t() + b)
    stats.cross[0, 0] = float("nan")
    fit = refit(stats, w[:, kept], b)
    assert not fit.applied and torch.equal(fit.weight, w[:, kept])
    assert any("not finite" in n for n in fit.notes)


def test_scale_refit_equals_numpy_lstsq_over_one_scale_per_column() -> None:
    """Kwon et al.'s mask tuning: one scale per kept input column, fitted over every row and output at once."""
    x, w, b = _data()
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    xp = x[:, kept] * 1.1
    y = x @ w.t() + b
    v = w[:, kept]
    fit = refit(_stats(xp, y), v, b, damp=0.0, intercept=False, mode="scales")
    # design: one column per kept input u, whose entries over (row r, output o) are x'[r, u] * v[o, u]
    design = (xp[:, None, :] * v[None, :, :]).reshape(-1, len(kept)).numpy()
    scales, *_ = np.linalg.lstsq(design, (y - b).reshape(-1).numpy(), rcond=None)
    np.testing.assert_allclose(fit.weight.numpy(), (v * torch.from_numpy(scales)[None, :]).numpy(), atol=1e-8)
    assert fit.applied and fit.error_after < fit.error_before
    # with the intercept: the scales of the centred problem, and the bias that matches the means
    with_bias = refit(_stats(xp, y), v, b, damp=0.0, intercept=True, mode="scales")
    xc, yc = xp - xp.mean(0), y - y.mean(0)
    design_c = (xc[:, None, :] * v[None, :, :]).reshape(-1, len(kept)).numpy()
    sc, *_ = np.linalg.lstsq(design_c, yc.reshape(-1).numpy(), rcond=None)
    np.testing.assert_allclose(with_bias.weight.numpy(), (v * torch.from_numpy(sc)[None, :]).numpy(), atol=1e-8)
    np.testing.assert_allclose(with_bias.bias.numpy(), (y.mean(0) - xp.mean(0) @ with_bias.weight.t()).numpy(),
                               atol=1e-8)


def test_scale_refit_is_damped_toward_the_layer_as_it_is() -> None:
    x, w, b = _data()
    kept = torch.tensor([1, 4, 6, 9])
    stats = _stats(x[:, kept], x @ w.t() + b)
    heavy = refit(stats, w[:, kept], b, damp=1e6, intercept=False, mode="scales")
    assert heavy.error_after <= heavy.error_before
    np.testing.assert_allclose(heavy.weight.numpy(), w[:, kept].numpy(), rtol=1e-3)  # scales ~1, not ~0
    fit = refit(_stats(x, x @ w.t() + b), w, b, damp=0.01, mode="scales")  # nothing removed: nothing to do
    assert not fit.applied and torch.equal(fit.weight, w)
