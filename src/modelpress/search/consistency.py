"""Whether a fresh latency measurement of a point reproduces the search's own: a statistical check over the
per-round speedups of both (no timing here; the rounds come in as numbers).

A search times every reported point in a few interleaved rounds against full float and full INT8
(``measurements.json``: ``rounds_vs_float``, ``rounds_vs_int8``); extraction times the written file again in
fresh rounds. The two sets of rounds agree when they could come from one distribution of speedups.

The test: Welch's t-test on the logarithms of the per-round speedups, with a practical floor. Why this one:

- a speedup is a ratio, so its noise is multiplicative: on logs a 2x and a 0.5x deviation weigh the same and the
  two sides' means compare as a ratio of geometric means, which the interval reports;
- it works from 2 rounds a side (the search's default is 3) and its p-value shrinks with the shift relative to
  the rounds' spread. A rank test cannot: the exact Mann-Whitney U (and any permutation test) on 3 against 3
  rounds has 20 arrangements, so its smallest two-sided p-value is 0.1 (2 against 2: 0.33) and it could never
  flag a shift at the default rounds;
- Welch (no equal-variance assumption): the search's rounds and the fresh ones run at different times, under
  different machine load, so their spreads differ;
- a shift is flagged only when it is significant (p < ``alpha``) AND the fresh speedup differs from the searched
  one by more than ``min_shift`` (5%): with two tight rounds a side a 1% difference can be significant yet
  changes no decision. A load spike in one round widens that side's spread, so the check errs towards
  "consistent" (a warning, not a verdict on the point), never towards a false alarm from a single round.

Fewer than ``min_rounds`` rounds on either side (a spread needs two): ``undecided``, saying why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ALPHA", "MIN_ROUNDS", "MIN_SHIFT", "compare_rounds", "latency_agreement", "warning_line"]

ALPHA = 0.05
MIN_SHIFT = 0.05  # relative: a fresh speedup within 5% of the searched one is never flagged
MIN_ROUNDS = 2
TEST = "welch-t on log per-round speedups"
REFERENCES = {"vs_float": "full float", "vs_int8": "full INT8"}


def compare_rounds(searched: Sequence[float], fresh: Sequence[float], *, alpha: float = ALPHA,
                   min_shift: float = MIN_SHIFT, min_rounds: int = MIN_ROUNDS) -> dict[str, Any]:
    """Whether ``fresh`` per-round speedups agree with ``searched`` ones within noise (module docstring).

    Returns a JSON-ready dict: ``verdict`` (``consistent``, ``inconsistent`` or ``undecided``), ``rounds``
    ([searched, fresh]), both medians, ``ratio`` (fresh over searched, geometric means), its
    ``1 - alpha`` ``interval``, the t ``statistic``, its ``df`` and ``p_value`` (None when undecided), and a
    ``reason`` when undecided."""
    s, f = _logs(searched, "searched"), _logs(fresh, "fresh")
    out: dict[str, Any] = {
        "test": TEST, "alpha": alpha, "min_shift": min_shift, "rounds": [len(s), len(f)],
        "searched_median": float(np.median(list(searched))) if len(s) else None,
        "fresh_median": float(np.median(list(fresh))) if len(f) else None,
        "ratio": None, "interval": None, "statistic": None, "df": None, "p_value": None,
    }
    if len(s) < min_rounds or len(f) < min_rounds:
        return {**out, "verdict": "undecided",
                "reason": f"needs at least {min_rounds} rounds on each side to estimate their spread "
                          f"(searched {len(s)}, fresh {len(f)})"}
    from scipy import stats

    diff = float(f.mean() - s.mean())
    vs, vf = float(s.var(ddof=1)) / len(s), float(f.var(ddof=1)) / len(f)
    se = math.sqrt(vs + vf)
    ratio = math.exp(diff)
    t: float | None
    df: float | None
    if se == 0.0:  # every round alike on both sides: the difference is exact (no spread to test against)
        t = 0.0 if diff == 0 else None  # infinite: JSON has no such number
        df, p, lo, hi = None, 1.0 if diff == 0 else 0.0, ratio, ratio
    else:
        t = diff / se
        df = (vs + vf) ** 2 / (vs**2 / (len(s) - 1) + vf**2 / (len(f) - 1))
        p = float(2 * stats.t.sf(abs(t), df))
        half = float(stats.t.ppf(1 - alpha / 2, df)) * se
        lo, hi = math.exp(diff - half), math.exp(diff + half)
    shifted = abs(ratio - 1.0) > min_shift
    verdict = "inconsistent" if p < alpha and shifted else "consistent"
    return {**out, "ratio": ratio, "interval": [lo, hi], "statistic": t, "df": df, "p_value": p,
            "verdict": verdict}


def latency_agreement(searched: Mapping[str, Any] | None, fresh: Mapping[str, Any], *, alpha: float = ALPHA,
                      min_shift: float = MIN_SHIFT, min_rounds: int = MIN_ROUNDS) -> dict[str, Any]:
    """The check of :func:`compare_rounds` per reference (``vs_float``; ``vs_int8`` where both sides have its
    rounds) between a point's search measurement (a ``measurements.json`` row, or None when the search never
    timed it) and its fresh one (``rounds_vs_float`` / ``rounds_vs_int8``). ``verdict``: ``inconsistent`` when
    any reference is, ``consistent`` when every decided one is (and one is), else ``undecided``."""
    if not searched:
        return {"verdict": "undecided", "reason": "the search did not measure this point (predicted latency only)",
                "references": {}}
    refs: dict[str, Any] = {}
    for key in REFERENCES:
        a, b = searched.get(f"rounds_{key}"), fresh.get(f"rounds_{key}")
        if a is not None and b is not None:
            refs[key] = compare_rounds(a, b, alpha=alpha, min_shift=min_shift, min_rounds=min_rounds)
    verdicts = [r["verdict"] for r in refs.values()]
    if "inconsistent" in verdicts:
        verdict = "inconsistent"
    elif "consistent" in verdicts:
        verdict = "consistent"
    else:
        verdict = "undecided"
    out: dict[str, Any] = {"verdict": verdict, "references": refs}
    if verdict == "undecided":
        out["reason"] = "; ".join(r["reason"] for r in refs.values()) or "no per-round speedups on both sides"
    return out


def warning_line(check: Mapping[str, Any], rounds: int) -> str | None:
    """One line for a check whose verdict is ``inconsistent`` (None otherwise): by how much the fresh speedup
    missed the search's, and the advice to measure more rounds (``rounds``: how many the fresh measurement had)."""
    if check.get("verdict") != "inconsistent":
        return None
    parts = []
    for key, r in check["references"].items():
        if r["verdict"] != "inconsistent":
            continue
        lo, hi = r["interval"]
        parts.append(f"{r['fresh_median']:.2f}x over {REFERENCES[key]} at extraction against {r['searched_median']:.2f}x "
                     f"in the search ({r['ratio'] - 1:+.0%}, {1 - r['alpha']:.0%} interval {lo - 1:+.0%}..{hi - 1:+.0%}, "
                     f"p={r['p_value']:.2g}, {r['rounds'][0]} vs {r['rounds'][1]} rounds)")
    return ("the search's latency was not reproduced: " + "; ".join(parts)
            + f"; measure again with more rounds (--rounds {max(2 * rounds, 6)}) on a quiet machine")


def _logs(values: Sequence[float], side: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise ValueError(f"{side} speedups must be finite and positive, got {list(values)}")
    return np.log(arr)
