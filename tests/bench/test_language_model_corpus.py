"""The language-model benchmark's corpus: held-out, calibration and train text share no documentation topic,
so its perplexity and fidelity are measured on text the tokenizer and the model never saw."""

from __future__ import annotations

from tests.bench.scripts import load_benchmark


def _benchmark():  # noqa: ANN202 - the benchmark script as a module
    return load_benchmark("language_model")


def test_corpus_splits_are_disjoint_by_topic_and_cover_the_corpus():
    from pydoc_data.topics import topics

    bench = _benchmark()
    splits = bench.corpus_splits(seed=0)
    sets = {k: set(v) for k, v in splits.items()}
    assert all(sets.values())
    assert not sets["train"] & sets["evaluation"]
    assert not sets["train"] & sets["calibration"]
    assert not sets["calibration"] & sets["evaluation"]
    assert set().union(*sets.values()) == {text.strip() for text in topics.values()}
    chars = {k: sum(map(len, v)) for k, v in splits.items()}
    assert chars["train"] > 0.6 * sum(chars.values())
    assert bench.corpus_splits(seed=0) == splits  # deterministic
