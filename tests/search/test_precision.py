"""The per-layer-kind precision table: leave-one-out savings scaled to the measured full model, and a fallback
when the two disagree in sign (no prediction of full INT8 slower than float when it measured faster)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from modelpress.search.precision import measure_precision_table

SPACE = SimpleNamespace(precisions=["float", "int8"], precision_layers=["b0.q", "b0.fc", "b1.q", "b1.fc"],
                        blocks=[SimpleNamespace(path="b0"), SimpleNamespace(path="b1")])
WEIGHTS = {"b0.q": 1.0, "b1.q": 1.0, "b0.fc": 3.0, "b1.fc": 3.0}


def _full_saving(table) -> float:  # noqa: ANN001
    return sum(v["int8"] for v in table.savings.values()) * table.blocks


def test_leave_one_out_savings_add_up_to_the_full_model():
    # full INT8 at 2x (saves 0.5 of float); putting q back in float costs 0.1, fc 0.3: scaled by 0.5 / 0.4
    speedups = {"full-int8": 2.0, "q@int8": 1 / 0.6, "fc@int8": 1 / 0.8}
    table = measure_precision_table(SPACE, speedups, weights=WEIGHTS)
    assert table.scale["int8"] == pytest.approx(1.25)
    assert table.saving("q", "int8") == pytest.approx(0.125 / 2)
    assert table.saving("fc", "int8") == pytest.approx(0.375 / 2)
    assert _full_saving(table) == pytest.approx(0.5)


def test_savings_that_disagree_with_the_full_model_are_shared_by_weight():
    """What MiniLM measured at batch 1: every variant with one kind back in float ran faster than full INT8."""
    speedups = {"full-int8": 2.0, "q@int8": 2.5, "fc@int8": 2.2}
    table = measure_precision_table(SPACE, speedups, weights=WEIGHTS)
    assert _full_saving(table) == pytest.approx(0.5)  # full INT8 predicted as measured, not slower than float
    assert table.saving("fc", "int8") == pytest.approx(3 * table.saving("q", "int8"))
    assert "shared by weight count" in table.measured["notes"]["int8"]
    unscaled = measure_precision_table(SPACE, speedups)  # without weights: left as measured, and said so
    assert _full_saving(unscaled) < 0 and "not scaled" in unscaled.measured["notes"]["int8"]
