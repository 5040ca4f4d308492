"""Mixed-precision policies: which bits (or float) each quantizable layer gets.

A policy maps layer names or glob patterns to a precision, in order, the last matching entry winning::

    {"*": "w8a8", "encoder.layer.0.*": "float", "*.attn_pv": "a8", "classifier": 4}

Values: ``"float"`` (leave the layer alone), an int (same bits for weights and activations),
``"wXaY"`` / ``"wX"`` / ``"aY"`` strings, or ``{"w": X, "a": Y}`` (missing or None: that side stays float).
Attention matmuls are named ``<attention module>.attn_qk`` and ``<attention module>.attn_pv``; their
precision is the activation bits.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from modelpress.errors import ModelpressError


@dataclass(frozen=True)
class LayerSpec:
    """Bits for one layer's weights and input activations; None keeps that side in float."""

    w_bits: int | None = 8
    a_bits: int | None = 8

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    def __str__(self) -> str:
        if self.is_float:
            return "float"
        return "".join(f"{k}{v}" for k, v in (("w", self.w_bits), ("a", self.a_bits)) if v is not None)


FLOAT = LayerSpec(None, None)
_SPEC_RE = re.compile(r"^(?:w(\d+))?(?:a(\d+))?$")


def _bits(v: Any, what: str) -> int | None:
    if v is None:
        return None
    b = int(v)
    if not 2 <= b <= 8:
        raise ModelpressError(f"{what} bits must be within 2..8, got {b}", "use 2 to 8, or 'float'")
    return b


def parse_spec(value: Any) -> LayerSpec:
    """One policy value -> LayerSpec."""
    if isinstance(value, LayerSpec):
        return value
    if value is None or (
        isinstance(value, str) and value.strip().lower() in ("float", "fp32", "none", "skip")
    ):
        return FLOAT
    if isinstance(value, bool):
        raise ModelpressError(f"invalid precision {value!r}", "use bits (2..8), 'wXaY' or 'float'")
    if isinstance(value, int):
        return LayerSpec(_bits(value, "weight"), _bits(value, "activation"))
    if isinstance(value, dict):
        unknown = set(value) - {"w", "a", "weights", "activations"}
        if unknown:
            raise ModelpressError(f"unknown precision keys {sorted(unknown)}", "use 'w' and 'a'")
        return LayerSpec(
            _bits(value.get("w", value.get("weights")), "weight"),
            _bits(value.get("a", value.get("activations")), "activation"),
        )
    if isinstance(value, str):
        m = _SPEC_RE.match(value.strip().lower())
        if m and (m.group(1) or m.group(2)):
            return LayerSpec(_bits(m.group(1), "weight"), _bits(m.group(2), "activation"))
        if value.strip().isdigit():
            return parse_spec(int(value))
    raise ModelpressError(
        f"invalid precision {value!r}", "use bits (2..8), 'w8a8', 'w4', {'w': 4, 'a': 8} or 'float'"
    )


class Policy:
    """Ordered (pattern, LayerSpec) rules over a default; the last matching rule wins."""

    def __init__(
        self, rules: dict[str, Any] | list[tuple[str, Any]] | None = None, default: Any = "w8a8"
    ) -> None:
        items = list(rules.items()) if isinstance(rules, dict) else list(rules or [])
        self.rules = [(str(p), parse_spec(v)) for p, v in items]
        self.default = parse_spec(default)

    def spec(self, name: str) -> LayerSpec:
        out = self.default
        for pattern, spec in self.rules:
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                out = spec
        return out

    def unmatched(self, names: list[str]) -> list[str]:
        """Patterns that match no layer (likely typos)."""
        return [p for p, _ in self.rules if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]

    def to_dict(self) -> dict[str, str]:
        return {"*default*": str(self.default), **{p: str(s) for p, s in self.rules}}
