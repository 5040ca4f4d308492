"""Unit lineage: which ORIGINAL unit (and block) every current one comes from, composed over the edit log.

Every edit appends a record to ``ModelGraph.edits``; the lineage is a pure function of those records,
so a saved model (whose edit log is in its JSON spec) reloads with the same lineage. Records:

- ``{"op": "remove_units", "group": NAME, "size": N, "units": [...]}``: units removed (indices before it),
- ``{"op": "permute", "group": NAME, "order": [...]}``: new unit j is the former unit ``order[j]``,
- ``{"op": "delete_block", "path": "a.b.3", "size": N}``: item 3 of the N items of container ``a.b``.

Group names carry their scope (``head:encoder.layer.2.attention``); deleting a block renumbers the later
items of its container, so lineage keys follow the current names and ``original_name`` maps one back.
"""

from __future__ import annotations

import numpy as np


def split_name(name: str) -> tuple[str, str, str]:
    """A group name as (kind, scope, suffix): ``"head:a.0.attn#1"`` -> ``("head", "a.0.attn", "#1")``."""
    kind, colon, rest = name.partition(":")
    if not colon:
        return name, "", ""
    scope, hash_, n = rest.partition("#")
    return kind, scope, hash_ + n


def join_name(kind: str, scope: str, suffix: str) -> str:
    return (f"{kind}:{scope}" if scope else kind) + suffix


def renumber(path: str, container: str, index: int) -> str | None:
    """``path`` after item ``index`` of ``container`` was deleted: None if it lay inside that item."""
    prefix = f"{container}." if container else ""
    if not path.startswith(prefix):
        return path
    head, _, tail = path[len(prefix) :].partition(".")
    if not head.isdigit():
        return path
    i = int(head)
    if i == index:
        return None
    if i < index:
        return path
    return prefix + str(i - 1) + ("." + tail if tail else "")


class Lineage:
    """Original unit indices per (current) group name and original item indices per block container."""

    def __init__(self) -> None:
        self.units: dict[str, np.ndarray] = {}
        self.blocks: dict[str, np.ndarray] = {}
        self.known = True  # False for edit logs written before lineage was recorded

    @classmethod
    def from_edits(cls, edits: list[dict]) -> Lineage:
        lin = cls()
        for e in edits:
            lin.record(e)
        return lin

    def record(self, edit: dict) -> None:
        """Compose one edit record into the lineage (other ops, e.g. ``setattr``, change no indices)."""
        op = edit.get("op")
        if op == "remove_units":
            prev = self.units.get(edit["group"], np.arange(int(edit["size"])))
            self.units[edit["group"]] = np.delete(prev, np.asarray(edit["units"], dtype=np.int64))
        elif op == "permute":
            order = np.asarray(edit["order"], dtype=np.int64)
            prev = self.units.get(edit["group"], np.arange(len(order)))
            self.units[edit["group"]] = prev[order]
        elif op == "delete_block":
            self._delete_block(edit)

    def _delete_block(self, edit: dict) -> None:
        container, _, idx = edit["path"].rpartition(".")
        index = int(idx)
        if "size" not in edit:
            self.known = False
            return
        prev = self.blocks.get(container, np.arange(int(edit["size"])))
        blocks: dict[str, np.ndarray] = {}
        for path, kept in self.blocks.items():
            new = renumber(path, container, index)
            if new is not None:
                blocks[new] = kept
        blocks[container] = np.delete(prev, index)
        self.blocks = blocks
        units: dict[str, np.ndarray] = {}
        for name, kept in self.units.items():
            kind, scope, suffix = split_name(name)
            new = renumber(scope, container, index)
            if new is not None:
                units[join_name(kind, new, suffix)] = kept
        self.units = units

    def original_path(self, path: str) -> str:
        """A current module path in the original model's numbering."""
        parts = path.split(".") if path else []
        out: list[str] = []
        for i, part in enumerate(parts):
            container = ".".join(parts[:i])
            kept = self.blocks.get(container)
            out.append(str(int(kept[int(part)])) if kept is not None and part.isdigit() else part)
        return ".".join(out)

    def original_name(self, name: str) -> str:
        """The name the group ``name`` had in the original (unedited) model."""
        kind, scope, suffix = split_name(name)
        return join_name(kind, self.original_path(scope), suffix)

    def to_dict(self) -> dict:
        """JSON-ready: recorded (edited) groups and containers only; identity elsewhere."""
        return {
            "groups": {k: v.tolist() for k, v in self.units.items()},
            "blocks": {k: v.tolist() for k, v in self.blocks.items()},
        }
