"""The extraction latency check as numbers in, verdict out (no timing): rounds from one distribution agree, a
clear shift is flagged and says by how much, too few rounds cannot decide, and the false-alarm rate on rounds
drawn from one distribution stays at the test's level."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.search.consistency import compare_rounds, latency_agreement, warning_line


def test_rounds_from_one_distribution_agree() -> None:
    r = compare_rounds([1.48, 1.55, 1.51], [1.53, 1.47, 1.50])
    assert r["verdict"] == "consistent"
    assert r["p_value"] > 0.05 and r["interval"][0] < 1.0 < r["interval"][1]
    assert r["rounds"] == [3, 3] and r["searched_median"] == pytest.approx(1.51)


def test_a_clear_shift_is_flagged() -> None:
    """The fresh rounds run 20% below the searched ones, well outside both sides' spread."""
    r = compare_rounds([1.50, 1.53, 1.48], [1.20, 1.23, 1.19])
    assert r["verdict"] == "inconsistent"
    assert r["p_value"] < 0.01
    assert r["ratio"] == pytest.approx(0.80, abs=0.01)
    assert r["interval"][1] < 0.9  # the whole interval says slower
    assert r["fresh_median"] == pytest.approx(1.20)


def test_a_significant_but_small_shift_is_not_flagged() -> None:
    """Tight rounds make a 2% difference significant; below the 5% floor it changes no decision."""
    r = compare_rounds([1.500, 1.501, 1.499], [1.470, 1.471, 1.469])
    assert r["p_value"] < 0.05
    assert r["verdict"] == "consistent"


def test_a_shift_inside_a_wide_spread_is_not_flagged() -> None:
    """A load spike in one searched round widens its spread: fresh rounds 10% lower are within that noise."""
    r = compare_rounds([1.6, 1.1, 1.7], [1.30, 1.35, 1.25])
    assert r["ratio"] == pytest.approx(0.90, abs=0.01)
    assert r["verdict"] == "consistent" and r["p_value"] > 0.05


@pytest.mark.parametrize(("searched", "fresh"), [([1.5], [1.2, 1.21, 1.19]), ([1.5, 1.52, 1.49], [1.2]), ([], [])])
def test_too_few_rounds_cannot_decide(searched: list[float], fresh: list[float]) -> None:
    r = compare_rounds(searched, fresh)
    assert r["verdict"] == "undecided"
    assert "at least 2 rounds" in r["reason"] and r["p_value"] is None


def test_rejects_speedups_that_are_not_positive() -> None:
    with pytest.raises(ValueError, match="finite and positive"):
        compare_rounds([1.5, 0.0], [1.5, 1.4])


def test_false_alarms_stay_at_the_level_and_clear_shifts_are_found() -> None:
    """Seeded draws with 2 to 5 rounds a side and a 4% per-round spread: rounds of one distribution are flagged
    at most at the test's 5% level; a 25% shift is found in most draws from 3 rounds a side on."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        same = [compare_rounds(1.5 * np.exp(rng.normal(0, 0.04, n)), 1.5 * np.exp(rng.normal(0, 0.04, n)))
                for _ in range(400)]
        assert np.mean([r["verdict"] == "inconsistent" for r in same]) <= 0.05, n
        if n >= 3:
            shifted = [compare_rounds(1.5 * np.exp(rng.normal(0, 0.04, n)), 1.125 * np.exp(rng.normal(0, 0.04, n)))
                       for _ in range(400)]
            assert np.mean([r["verdict"] == "inconsistent" for r in shifted]) >= 0.8, n


def test_agreement_over_both_references_and_its_warning() -> None:
    searched = {"rounds_vs_float": [2.0, 2.04, 1.98], "rounds_vs_int8": [1.20, 1.22, 1.19]}
    same = latency_agreement(searched, {"rounds_vs_float": [2.02, 1.99, 2.01], "rounds_vs_int8": [1.21, 1.20, 1.19]})
    assert same["verdict"] == "consistent" and set(same["references"]) == {"vs_float", "vs_int8"}
    assert warning_line(same, 3) is None
    # only the INT8 reference moved: one inconsistent reference makes the verdict
    moved = latency_agreement(searched, {"rounds_vs_float": [2.02, 1.99, 2.01], "rounds_vs_int8": [0.90, 0.92, 0.91]})
    assert moved["verdict"] == "inconsistent"
    assert moved["references"]["vs_float"]["verdict"] == "consistent"
    line = warning_line(moved, 3)
    assert line is not None and "\n" not in line
    assert "0.91x over full INT8" in line and "1.20x in the search" in line and "-24%" in line
    assert "--rounds 6" in line
    # a run from before the INT8 rounds were recorded: checked against full float only
    old = latency_agreement({"rounds_vs_float": [2.0, 2.04, 1.98]}, {"rounds_vs_float": [1.5, 1.51, 1.49],
                                                                     "rounds_vs_int8": [0.9, 0.91, 0.9]})
    assert set(old["references"]) == {"vs_float"} and old["verdict"] == "inconsistent"
    # a point the search never timed (predicted latency only)
    none = latency_agreement(None, {"rounds_vs_float": [1.5, 1.51]})
    assert none["verdict"] == "undecided" and "did not measure" in none["reason"]
    # one fresh round: no spread, no decision, and no warning
    one = latency_agreement(searched, {"rounds_vs_float": [1.0], "rounds_vs_int8": [0.5]})
    assert one["verdict"] == "undecided" and "at least 2 rounds" in one["reason"] and warning_line(one, 1) is None
