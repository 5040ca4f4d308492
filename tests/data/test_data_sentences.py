"""The packaged sentences: real, varied, enough of them, and calibration never overlaps evaluation."""

from __future__ import annotations

import re
from importlib import resources

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


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def test_training_corpus_is_large_clean_and_disjoint_from_evaluation() -> None:
    corpus = packaged_sentences("corpus")
    cal, ev = packaged_sentences("calibration"), packaged_sentences("evaluation")
    assert len(corpus) >= 30_000
    assert all(5 <= len(s.split()) <= 60 for s in corpus)
    keys = [" ".join(_words(s)) for s in corpus]
    assert len(set(keys)) == len(keys)  # no duplicates, even ignoring case and punctuation
    assert not set(keys) & {" ".join(_words(s)) for s in ev + cal}
    ev_runs = {tuple(w[i : i + 8]) for w in map(_words, ev) for i in range(len(w) - 7)}
    assert not any(tuple(w[i : i + 8]) in ev_runs for w in map(_words, corpus) for i in range(len(w) - 7))
    code_like = [s for s in corpus if re.search(r"[{}<>=_\\]|def |\(\)", s)]
    assert len(code_like) < 0.001 * len(corpus), code_like[:5]
    assert packaged_sentences("train") == cal + corpus  # train = everything outside evaluation


def test_training_corpus_notes_its_sources_and_licences() -> None:
    readme = resources.files("modelpress.data").joinpath("sentences", "README.md").read_text(encoding="utf-8")
    for fact in ("WordNet 3.0 Copyright 2006 by Princeton University", "public domain", f"{len(packaged_sentences('corpus')):,}"):
        assert fact in readme
