"""The packaged sentences: real, varied, enough of them, and calibration never overlaps evaluation."""

from __future__ import annotations

from modelpress.data import packaged_sentences


def test_counts_and_disjointness() -> None:
    cal = packaged_sentences("calibration")
    ev = packaged_sentences("evaluation")
    assert len(cal) >= 200 and len(ev) >= 240
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)  # no duplicates inside a split
    assert not set(cal) & set(ev)
    assert not {s.lower() for s in cal} & {s.lower() for s in ev}


def test_sentences_look_like_sentences() -> None:
    for s in packaged_sentences("calibration") + packaged_sentences("evaluation"):
        assert 15 <= len(s) <= 200, s
        assert s[0].isupper() or s[0].isdigit(), s
        assert s[-1] in ".?!", s
    questions = [s for s in packaged_sentences("evaluation") if s.endswith("?")]
    assert len(questions) >= 10
