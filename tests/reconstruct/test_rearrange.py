"""Kwon et al.'s mask rearrangement: the Fisher block of the unit masks re-chooses which units go."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modelpress.data import probes
from modelpress.graph import ModelGraph
from modelpress.graph.inputs import InputSpec
from modelpress.reconstruct.rearrange import mask_fisher, mask_scores, rearrange, removal_loss


def test_correlated_units_do_not_go_together() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(256, 1))
    scores = np.concatenate([z + 0.05 * rng.normal(size=(256, 2)),  # units 0 and 1: the least salient, alike
                             1.2 * rng.normal(size=(256, 1)),  # unit 2: a bit more salient, independent
                             3 * rng.normal(size=(256, 5))], axis=1)
    fisher = mask_fisher(scores)
    diagonal = sorted(np.argsort(np.diag(fisher))[:2].tolist())
    assert diagonal == [0, 1]  # per-unit saliency removes both
    chosen = rearrange(scores, 2)
    assert 2 in chosen and len({0, 1} & set(chosen)) == 1
    assert removal_loss(fisher, chosen) < 0.75 * removal_loss(fisher, diagonal)


def test_rearrangement_never_raises_the_loss_of_the_initial_choice() -> None:
    rng = np.random.default_rng(1)
    for trial in range(20):
        units = int(rng.integers(3, 16))
        mix = rng.normal(size=(units, units))
        scores = rng.normal(size=(32, units)) @ mix
        k = int(rng.integers(1, units))
        initial = sorted(rng.choice(units, k, replace=False).tolist())
        chosen = rearrange(scores, k, initial)
        assert len(chosen) == k == len(set(chosen))
        assert removal_loss(mask_fisher(scores), chosen) <= removal_loss(mask_fisher(scores), initial) + 1e-9, trial
    assert rearrange(scores, 0) == []


def test_mask_scores_are_the_gradients_of_a_mask_on_each_unit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    graph = ModelGraph(model, InputSpec(kind="tensor", names=["x"], shape=(6,)))
    group = next(g for g in graph.groups if g.kind == "mlp")
    samples = [torch.randn(1, 6) for _ in range(5)]
    target = torch.randn(1, 3)

    def loss(out, _batch):  # noqa: ANN001, ANN202
        return ((out - target) ** 2).sum()

    stats = probes.collect(model, samples, None, {"grads"}, loss_fn=loss, params=["2.weight"])
    scores = mask_scores(stats, group)  # [samples, units]
    for i, x in enumerate(samples):
        mask = torch.ones(10, requires_grad=True)
        out = model[2](model[1](model[0](x)) * mask)
        (g,) = torch.autograd.grad(loss(out, None), mask)
        order = [int(u[("2.weight", 1)][0]) for u in group.units]  # unit -> its hidden index
        np.testing.assert_allclose(scores[i], g.detach().numpy()[order], rtol=1e-5, atol=1e-6)


def test_collected_mask_scores_match_the_probed_ones() -> None:
    from modelpress.reconstruct.rearrange import collect_mask_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    graph = ModelGraph(model, InputSpec(kind="tensor", names=["x"], shape=(6,)))
    group = next(g for g in graph.groups if g.kind == "mlp")
    samples = [{"x": torch.randn(1, 6)} for _ in range(4)]

    def loss(out, _batch):  # noqa: ANN001, ANN202
        return out.pow(3).sum()

    stats = probes.collect(model, [s["x"] for s in samples], None, {"grads"}, loss_fn=loss, params=["2.weight"])
    got = collect_mask_scores(model, [group], samples, loss, ["x"])[group.name]
    np.testing.assert_allclose(got, mask_scores(stats, group), rtol=1e-6, atol=1e-9)
