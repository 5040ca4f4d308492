"""A small Llama trained on this Python's standard library sources: the real LM the LLM benchmarks measure on.

**Corpus** (offline, nothing downloaded): every ``.py`` file of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), without ``site-packages`` and the test suites (``test``, ``tests``,
``idle_test`` folders); Python Software Foundation License. Files are split *by file* on a hash of their
path relative to the library (deterministic, independent of the file order and of other files): about 5%
evaluation, 5% calibration, 90% train. The tokenizer and the model see only the train files.

**Tokenizer**: a byte-level BPE (``tokenizers``, vocabulary 8192, ``<|endoftext|>`` between files) trained on
the train files, saved as a Hugging Face fast tokenizer (``AutoTokenizer`` loads the folder).

**Model**: ``transformers.LlamaForCausalLM``: 6 blocks, hidden 512, 8 query heads over 2 key/value heads
(grouped-query attention), SwiGLU MLP 1536, rotary positions (512), tied embedding/LM head; 22.3M parameters.
Trained from ``seed`` through :func:`modelpress.train.train` (next-token cross-entropy, AdamW, cosine
schedule) on shuffled 256-token windows of the train files, 2 threads. The held-out perplexity of the
evaluation files before and after training is kept in ``zoo.json``.

Cache: ``$MODELPRESS_CACHE/zoo/stdlib-llama-py<major><minor>-v<version>-seed<seed>`` (another Python has another
library, hence another corpus), written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.data.sources import DataSplit
from modelpress.data.tasks import LanguageModelTask
from modelpress.errors import ModelpressError
from modelpress.progress import QUIET, Reporter
from modelpress.train.config import TrainConfig
from modelpress.train.loop import train
from modelpress.train.zoo import _cached, _quiet_hf

__all__ = ["STDLIB_CORPUS", "StdlibLM", "held_out_perplexity", "stdlib_files", "stdlib_llama", "stdlib_splits",
           "stdlib_windows"]

VERSION = "1"  # bump when the corpus split, tokenizer, model or training changes
VOCAB = 8192
SEQ = 256  # training window; rotary positions go to 512 (prompt 128 + generation fits)
STEPS, BATCH, LR = 100, 8, 2e-3
THREADS = 2
EVAL_WINDOWS = 64  # held-out windows scored for the perplexity in zoo.json
EOS = "<|endoftext|>"
MODEL = {
    "num_hidden_layers": 6,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
SHARES = {"evaluation": 5, "calibration": 5}  # percent of the files, by path hash; the rest is train
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
STDLIB_CORPUS = (
    "the .py sources of this Python's standard library (CPython {version}, tests and site-packages "
    "excluded), Python Software Foundation License; split by file (path hash) into train / calibration / "
    "evaluation"
)


@dataclass
class StdlibLM:
    """The trained LM: module (eval mode), tokenizer, its cache folder and how it was made (``meta``:
    parameters, held-out perplexity before and after training, seconds, corpus sizes, ...)."""

    module: nn.Module
    tokenizer: Any
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def stdlib_files(root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``(path relative to the library, text)`` of every standard-library ``.py`` file (sorted; files that are
    not UTF-8 are skipped), without site-packages and test suites."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel.as_posix(), text))
    return out


def stdlib_splits(root: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The library's files split by file into ``train``, ``calibration`` and ``evaluation`` texts: a file's
    split is fixed by the SHA-256 of its relative path (no text is in two splits, no seed moves them)."""
    splits: dict[str, list[str]] = {"train": [], "calibration": [], "evaluation": []}
    for rel, text in stdlib_files(root):
        bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 100
        if bucket < SHARES["evaluation"]:
            splits["evaluation"].append(text)
        elif bucket < SHARES["evaluation"] + SHARES["calibration"]:
            splits["calibration"].append(text)
        else:
            splits["train"].append(text)
    return splits


def stdlib_windows(tokenizer: Any, texts: list[str], seq: int = SEQ) -> torch.Tensor:
    """The texts tokenized, each followed by the end-of-text token, joined and cut into non-overlapping
    ``seq``-token windows: a LongTensor [N, seq]."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eos)
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).reshape(n, seq)


def stdlib_llama(
    seed: int = 0,
    steps: int = STEPS,
    cache_dir: str | os.PathLike | None = None,
    reporter: Reporter = QUIET,
) -> StdlibLM:
    """The Llama of this module's docstring, trained once from ``seed`` for ``steps`` steps (about 20 min on
    2 cores; fewer steps for a smoke run, cached apart), then loaded from the cache."""
    import transformers

    if steps < 10:
        raise ModelpressError(f"steps must be >= 10, got {steps}", "give a training budget of 10 steps or more")

    def fit(folder: Path) -> dict[str, Any]:
        return _fit(folder, seed, steps, reporter)

    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"stdlib-llama-{tag}" + ("" if steps == STEPS else f"-steps{steps}")
    folder = _cached(name, seed, cache_dir, fit, reporter, version=VERSION)
    with _quiet_hf(), torch.random.fork_rng(devices=[]):
        module = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return StdlibLM(module=module, tokenizer=tokenizer, path=folder, meta=json.loads((folder / "zoo.json").read_text()))


# -- training ------------------------------------------------------------------------------------------------


def _tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE of vocabulary :data:`VOCAB` trained on ``texts``, as a PreTrainedTokenizerFast."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def _split(rows: torch.Tensor, batch_size: int) -> DataSplit:
    return DataSplit(
        batches=[
            {"input_ids": rows[i : i + batch_size], "attention_mask": torch.ones_like(rows[i : i + batch_size])}
            for i in range(0, len(rows), batch_size)
        ]
    )


@torch.no_grad()
def held_out_perplexity(model: nn.Module, rows: torch.Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every position of ``rows`` [N, S]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids = rows[i : i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def _fit(folder: Path, seed: int, steps: int, reporter: Reporter) -> dict[str, Any]:
    import transformers

    splits = stdlib_splits()
    with reporter.step(f"byte-level BPE ({VOCAB}) on {len(splits['train'])} standard-library files"):
        tokenizer = _tokenizer(splits["train"])
    train_rows = stdlib_windows(tokenizer, splits["train"])
    eval_rows = stdlib_windows(tokenizer, splits["evaluation"])[:EVAL_WINDOWS]
    threads = torch.get_num_threads()
    torch.set_num_threads(min(THREADS, os.cpu_count() or 1))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            eos = tokenizer.convert_tokens_to_ids(EOS)
            config = transformers.LlamaConfig(
                vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **MODEL
            )
            model = transformers.LlamaForCausalLM(config)
            before = held_out_perplexity(model, eval_rows)
            reporter.log(f"held-out perplexity before training: {before:.1f}")
            cfg = TrainConfig(
                steps=steps, lr=LR, weight_decay=0.1, batch_size=BATCH, warmup_steps=max(1, steps // 10),
                seed=seed, grad_clip=1.0, log_every=max(1, steps // 20),
            )
            result = train(
                model, _split(train_rows, BATCH), task=LanguageModelTask(), config=cfg, reporter=reporter,
                input_names=["input_ids", "attention_mask"],
            )
            model.eval()
            after = held_out_perplexity(model, eval_rows)
            reporter.log(f"held-out perplexity after {result.steps} steps: {after:.2f} (before {before:.1f})")
    finally:
        torch.set_num_threads(threads)
    with _quiet_hf():
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return {
        "corpus": STDLIB_CORPUS.format(version=sys.version.split()[0]),
        "corpus_files": {k: len(v) for k, v in splits.items()},
        "corpus_characters": {k: sum(map(len, v)) for k, v in splits.items()},
        "train_tokens_available": int(train_rows.numel()),
        "train_tokens_seen": steps * BATCH * SEQ,
        "model": {"architecture": "LlamaForCausalLM", **MODEL, "vocab_size": len(tokenizer)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": {**cfg.model_dump(mode="json"), "seq": SEQ, "threads": min(THREADS, os.cpu_count() or 1),
                  "final_loss": round(result.final_loss, 4), "losses": result.losses},
        "held_out": {"windows": int(len(eval_rows)), "seq": SEQ, "perplexity_before": round(before, 2),
                     "perplexity_after": round(after, 3)},
    }
