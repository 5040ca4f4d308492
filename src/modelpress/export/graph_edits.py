"""Small in-place edits of an ONNX graph that the export rewrites share: keep a subset of the nodes (in order),
drop the initializers nothing reads any more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def keep_nodes(g: Any, keep: Callable[[Any], bool]) -> None:
    """Keep the nodes of ``g`` (an ``onnx.GraphProto``) for which ``keep(node)`` holds, in their order."""
    nodes = [n for n in g.node if keep(n)]
    del g.node[:]
    g.node.extend(nodes)


def drop_unused_initializers(g: Any) -> None:
    """Remove the initializers of ``g`` that no node and no graph output reads."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
