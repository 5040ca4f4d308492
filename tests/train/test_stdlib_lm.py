"""The stdlib Llama's corpus and tokenizer (the model itself trains once into the cache, never in a test): the
standard library's files split by file, deterministically, without test suites; the byte-level BPE saved as a
folder AutoTokenizer loads; windows joined by the end-of-text token; a bad budget refused."""

from __future__ import annotations

import pytest

from modelpress.errors import ModelpressError
from modelpress.train.stdlib_lm import (
    EOS,
    _tokenizer,
    stdlib_files,
    stdlib_llama,
    stdlib_splits,
    stdlib_windows,
)

transformers = pytest.importorskip("transformers")


def test_splits_are_by_file_disjoint_deterministic_and_without_tests():
    files = stdlib_files()
    assert len(files) > 300 and not any("/test/" in f"/{rel}" or "site-packages" in rel for rel, _ in files)
    a, b = stdlib_splits(), stdlib_splits()
    assert a == b
    texts = {k: set(v) for k, v in a.items()}
    assert not (texts["train"] & texts["evaluation"]) and not (texts["train"] & texts["calibration"])
    assert not (texts["evaluation"] & texts["calibration"])
    n = {k: len(v) for k, v in a.items()}
    assert 0.02 < n["evaluation"] / len(files) < 0.09 and 0.02 < n["calibration"] / len(files) < 0.09
    assert sum(n.values()) == len(files)


def test_tokenizer_folder_loads_with_autotokenizer_and_windows_end_files_with_eos(tmp_path):
    import sysconfig
    from pathlib import Path

    texts = [text for _, text in stdlib_files(Path(sysconfig.get_paths()["stdlib"]) / "json")]
    tok = _tokenizer(texts)
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    code = "def f(x):\n    return x  # comment\n"
    assert loaded.decode(loaded(code)["input_ids"]) == code  # byte-level: exact round trip, indentation kept
    rows = stdlib_windows(loaded, texts, seq=64)
    eos = loaded.convert_tokens_to_ids(EOS)
    assert rows.shape[1] == 64 and int((rows == eos).sum()) >= len(texts) - 1


def test_a_budget_below_ten_steps_is_refused():
    with pytest.raises(ModelpressError, match="steps must be >= 10"):
        stdlib_llama(steps=3, cache_dir="/nonexistent")
