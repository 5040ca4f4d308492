"""The ``fuse.ot`` merge pass on digits with three different tiny parents: the weighted ensemble is reported
and weighted like the fusion, ``weights`` change the fused model, recovery runs (distillation from the
ensemble through the Context's service) and changes the fused model's quality."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ot")
pytest.importorskip("sklearn")

from modelpress.data import load_data  # noqa: E402
from modelpress.data.tasks import ClassificationTask  # noqa: E402
from modelpress.fuse.passes import FuseOT  # noqa: E402
from modelpress.passes import Context  # noqa: E402
from tests.fuse.tiny import trained_digits_vit  # noqa: E402


@pytest.fixture(scope="module")
def parents():
    return [trained_digits_vit(seed, steps=60) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def run(parents, tmp_path_factory):
    data = load_data("digits", parents[0].input_spec, batch_size=32, n_calibration=64, n_evaluation=96)

    def apply(**config):  # noqa: ANN202
        ctx = Context(workdir=tmp_path_factory.mktemp("work"), task=ClassificationTask(), data=data,
                      reference=parents[0], seed=0)
        return FuseOT({"samples": 32, "recover_vanilla": False, **config}).apply(parents, ctx), ctx

    return apply


def test_weights_pick_the_fused_model_and_the_ensemble(parents, run):
    x = parents[0].example_inputs(16, seed=4)
    for i in (0, 2):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 1.0
        result, _ = run(weights=weights)
        quality = result.metrics["quality"]
        assert result.metrics["weights"] == weights
        assert quality["ensemble"] == quality["parents"][parents[i].name]  # the ensemble is parent i alone
        assert quality["fused"]["one_shot"] == quality["parents"][parents[i].name]
        torch.testing.assert_close(result.graph.forward(x), parents[i].forward(x), atol=1e-5, rtol=1e-5)
    assert quality["parents"][parents[0].name] != quality["parents"][parents[2].name]


def test_recovery_distils_the_ensemble_and_changes_quality(run):
    result, ctx = run(recover_steps=30, lr=2e-3)
    metrics = result.metrics
    assert set(metrics["quality"]) == {"parents", "ensemble", "fused", "vanilla"}
    assert "recovered" not in metrics["quality"]["vanilla"]  # recover_vanilla off
    fused = metrics["quality"]["fused"]
    assert fused["recovered"]["accuracy"] > fused["one_shot"]["accuracy"] + 0.1
    assert ctx.evaluate(result.graph, torch_only=True).metrics["accuracy"] == pytest.approx(fused["recovered"]["accuracy"])
    info = metrics["recovery"]["fused"]
    assert info["steps"] == 30 and info["loss_end"] < info["loss_start"]
    # distilled from the ensemble: its agreement with the anchor moves toward the ensemble's
    ensemble = metrics["quality"]["ensemble"]["agreement"]
    assert abs(fused["recovered"]["agreement"] - ensemble) < abs(fused["one_shot"]["agreement"] - ensemble)
