"""The search space: per block (heads, MLP width, kept or skipped, optionally head dim), the residual width
optionally, and a precision gene per quantizable Linear; encoded as integer vectors for NSGA-II.

A sub-network **config** is plain JSON::

    {"blocks": [{"heads": 3, "mlp": 128, "keep": true, "head_dim": 16}, ...],
     "embed": 64, "precision": {"vit.layers.0.mlp.fc1": "int8", ...}}

Widths count units of the graph's groups (heads: key/value-head units, as the graph's head groups do);
every sub-network takes the *leading* units of each group (the super-network orders them by saliency).
Precision names are module paths of the original (super-network) model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.graph.stats import in_block

PRECISIONS = ("float", "int8", "w4a8")
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class BlockSpace:
    """The choices of one block: unit counts of its head, MLP and head-dim groups (empty: not searched)."""

    path: str
    head_group: str | None = None
    mlp_group: str | None = None
    head_dim_group: str | None = None
    heads: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    head_dim: list[int] = field(default_factory=list)
    skippable: bool = True
    # the container this block is one of several items of (None: alone in it), so that skipping never
    # empties a container (a stage of a hierarchical model)
    container: str | None = None


@dataclass
class SearchSpace:
    """Architecture genes per block, the embedding width, and one precision gene per quantizable Linear."""

    blocks: list[BlockSpace]
    embed_groups: list[str] = field(default_factory=list)
    embed: list[int] = field(default_factory=list)
    precision_layers: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=lambda: ["float"])

    # ----- construction
    @classmethod
    def from_graph(
        cls,
        graph: ModelGraph,
        *,
        head_fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
        mlp_fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
        head_dim_fractions: tuple[float, ...] = (),
        embed_fractions: tuple[float, ...] = (),
        skip_blocks: bool = True,
        precisions: tuple[str, ...] = ("float", "int8"),
        multiple: int = 1,
    ) -> SearchSpace:
        """The space of ``graph``: unit counts at ``*_fractions`` of each group's size (rounded to
        ``multiple`` units, at least one), blocks skippable, precision genes over ``precisions``."""
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad or not precisions:
            raise ModelpressError(f"unknown precisions {bad or precisions}", f"use some of {', '.join(PRECISIONS)}")
        blocks = []
        for b in graph.blocks:
            inside = [g for g in graph.groups if in_block(g.scope, b.path) and g.prunable]
            first = {k: next((g for g in inside if g.kind == k), None) for k in ("head", "mlp", "head_dim")}
            bs = BlockSpace(b.path, skippable=skip_blocks and b.removable,
                            container=b.container if b.removal == "delete" else None)
            if first["head"] is not None:
                bs.head_group, bs.heads = first["head"].name, _counts(first["head"].size, head_fractions, 1)
            if first["mlp"] is not None:
                bs.mlp_group, bs.mlp = first["mlp"].name, _counts(first["mlp"].size, mlp_fractions, multiple)
            if first["head_dim"] is not None and head_dim_fractions:
                g = first["head_dim"]
                bs.head_dim_group, bs.head_dim = g.name, _counts(g.size, head_dim_fractions, multiple)
            blocks.append(bs)
        embeds = [g for g in graph.groups if g.kind == "embedding" and g.prunable]
        embed_groups, embed = [], []
        if embed_fractions and embeds:
            embed_groups = [g.name for g in embeds]
            embed = _counts(min(g.size for g in embeds), embed_fractions, multiple)
        layers = quantizable_linears(graph.module, [b.path for b in graph.blocks]) if len(precisions) > 1 else []
        space = cls(blocks, embed_groups, embed, layers, list(precisions))
        if space.cardinality() <= 1:
            raise ModelpressError(
                f"the search space of {graph.name} is empty (one sub-network: the model itself)",
                "the model needs blocks with prunable heads or MLPs, skippable blocks, or precision choices",
            )
        return space

    # ----- genes
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive integer bounds of every gene."""
        upper: list[int] = []
        for b in self.blocks:
            upper += [len(b.heads) - 1] if b.heads else []
            upper += [len(b.mlp) - 1] if b.mlp else []
            upper += [len(b.head_dim) - 1] if b.head_dim else []
            upper += [1] if b.skippable else []
        upper += [len(self.embed) - 1] if self.embed else []
        upper += [len(self.precisions) - 1] * len(self.precision_layers)
        up = np.array(upper, dtype=np.int64)
        return np.zeros_like(up), up

    @property
    def n_genes(self) -> int:
        return len(self.bounds()[1])

    def cardinality(self) -> int:
        return int(np.prod([u + 1 for u in self.bounds()[1].tolist()], dtype=object)) if self.n_genes else 1

    def decode(self, x: np.ndarray | list[int]) -> dict[str, Any]:
        """Gene vector -> config (at least one block is kept, and one of every container's: if none is, the
        last one is)."""
        x = [int(v) for v in np.asarray(x).tolist()]
        i = 0
        blocks = []
        for b in self.blocks:
            row: dict[str, Any] = {}
            if b.heads:
                row["heads"], i = b.heads[x[i]], i + 1
            if b.mlp:
                row["mlp"], i = b.mlp[x[i]], i + 1
            if b.head_dim:
                row["head_dim"], i = b.head_dim[x[i]], i + 1
            row["keep"] = True
            if b.skippable:
                row["keep"], i = bool(x[i]), i + 1
            blocks.append(row)
        for items in _by_container(self.blocks).values():  # a container keeps one of its blocks
            if not any(blocks[k]["keep"] for k in items):
                blocks[items[-1]]["keep"] = True
        if blocks and not any(r["keep"] for r in blocks):
            blocks[-1]["keep"] = True
        embed = None
        if self.embed:
            embed, i = self.embed[x[i]], i + 1
        precision = {name: self.precisions[x[i + k]] for k, name in enumerate(self.precision_layers)}
        return {"blocks": blocks, "embed": embed, "precision": precision}

    def encode(self, config: dict[str, Any]) -> np.ndarray:
        """Config -> gene vector (widths not on the grid are ModelpressErrors)."""
        self.check(config)
        x: list[int] = []
        for b, row in zip(self.blocks, config["blocks"], strict=True):
            for key, choices in (("heads", b.heads), ("mlp", b.mlp), ("head_dim", b.head_dim)):
                if choices:
                    x.append(choices.index(row.get(key, choices[-1])))
            if b.skippable:
                x.append(int(bool(row.get("keep", True))))
        if self.embed:
            x.append(self.embed.index(config.get("embed") or self.embed[-1]))
        prec = config.get("precision") or {}
        x += [self.precisions.index(prec.get(n, "float")) for n in self.precision_layers]
        return np.array(x, dtype=np.int64)

    def check(self, config: dict[str, Any]) -> None:
        """Raise ModelpressError unless ``config`` is a sub-network of this space."""
        rows = config.get("blocks")
        if not isinstance(rows, list) or len(rows) != len(self.blocks):
            raise ModelpressError(
                f"the config has {len(rows) if isinstance(rows, list) else 'no'} blocks; the space has {len(self.blocks)}",
                "give one entry per block",
            )
        for b, row in zip(self.blocks, rows, strict=True):
            for key, choices in (("heads", b.heads), ("mlp", b.mlp), ("head_dim", b.head_dim)):
                if choices and row.get(key, choices[-1]) not in choices:
                    raise ModelpressError(f"{b.path}: {key}={row.get(key)} is not one of {choices}")
            if not b.skippable and not row.get("keep", True):
                raise ModelpressError(f"block {b.path} cannot be skipped in this space")
        if not any(r.get("keep", True) for r in rows):
            raise ModelpressError("the config keeps no block", "keep at least one")
        for container, items in _by_container(self.blocks).items():
            if not any(rows[k].get("keep", True) for k in items):
                raise ModelpressError(f"the config skips every block of {container}", "keep one of them")
        if self.embed and (config.get("embed") or self.embed[-1]) not in self.embed:
            raise ModelpressError(f"embed={config.get('embed')} is not one of {self.embed}")
        for name, p in (config.get("precision") or {}).items():
            if name not in self.precision_layers or p not in self.precisions:
                raise ModelpressError(f"precision {name}={p!r} is not in the space")

    def largest(self, precision: str = "float") -> dict[str, Any]:
        return self._uniform(lambda choices: len(choices) - 1, precision)

    def smallest(self, precision: str = "float", *, skip: bool = False) -> dict[str, Any]:
        """Every width at its lowest choice; with ``skip``, every skippable block skipped too (decoding keeps
        one block per container, and one in all)."""
        config = self._uniform(lambda choices: 0, precision)
        if not skip:
            return config
        x = self.encode(config)
        i = 0
        for b in self.blocks:  # the keep genes, in gene order
            i += bool(b.heads) + bool(b.mlp) + bool(b.head_dim)
            if b.skippable:
                x[i] = 0
                i += 1
        return self.decode(x)

    def uniform(self, fraction: float, precision: str = "float") -> dict[str, Any]:
        """Every block at the choice nearest ``fraction`` of its full width, all blocks kept."""
        return self._uniform(lambda c: int(np.argmin([abs(v / c[-1] - fraction) for v in c])), precision)

    def _uniform(self, pick: Any, precision: str) -> dict[str, Any]:
        blocks = []
        for b in self.blocks:
            row: dict[str, Any] = {"keep": True}
            for key, choices in (("heads", b.heads), ("mlp", b.mlp), ("head_dim", b.head_dim)):
                if choices:
                    row[key] = choices[pick(choices)]
            blocks.append(row)
        embed = self.embed[pick(self.embed)] if self.embed else None
        prec = precision if precision in self.precisions else "float"
        return {"blocks": blocks, "embed": embed, "precision": {n: prec for n in self.precision_layers}}

    def random(self, rng: np.random.Generator) -> dict[str, Any]:
        lo, up = self.bounds()
        return self.decode(rng.integers(lo, up + 1))

    # ----- identity
    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": [asdict(b) for b in self.blocks],
            "embed_groups": list(self.embed_groups),
            "embed": list(self.embed),
            "precision_layers": list(self.precision_layers),
            "precisions": list(self.precisions),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        return cls(
            [BlockSpace(**b) for b in d["blocks"]], list(d["embed_groups"]), list(d["embed"]),
            list(d["precision_layers"]), list(d["precisions"]),
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _counts(size: int, fractions: tuple[float, ...], multiple: int) -> list[int]:
    out = set()
    for f in fractions:
        n = int(round(size * f / multiple)) * multiple
        out.add(min(size, max(1, n)))
    return sorted(out)


def quantizable_linears(module: nn.Module, blocks: list[str]) -> list[str]:
    """The nn.Linear modules inside the blocks (the classifier and embeddings stay float)."""
    return [
        name for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and any(in_block(name, b) for b in blocks)
    ]


def config_key(config: dict[str, Any]) -> str:
    """A stable string identity of a config (for de-duplication)."""
    return json.dumps(config, sort_keys=True)


def dedupe(configs: list[dict[str, Any]], seen: set[str]) -> list[dict[str, Any]]:
    """The configs whose key is not in ``seen`` (first occurrence kept), adding their keys to it."""
    out = []
    for c in configs:
        k = config_key(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def _by_container(blocks: list[BlockSpace]) -> dict[str, list[int]]:
    """Container -> the indices of its skippable blocks (blocks alone in their container left out)."""
    out: dict[str, list[int]] = {}
    for k, b in enumerate(blocks):
        if b.container is not None and b.skippable:
            out.setdefault(b.container, []).append(k)
    return out
