"""`modelpress inspect`: the structure of a model, per block, and its size and MACs."""

from __future__ import annotations

from modelpress.cli.common import (
    AsJson,
    Ckpt,
    InputShape,
    Quiet,
    TrustPickle,
    load_graph,
    print_json,
    print_rich,
    reporter,
)


def inspect(
    ckpt: Ckpt = None, quiet: Quiet = False, as_json: AsJson = False, trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
) -> None:
    """Per block: heads, head dim, MLP width; embedding width; parameters; MACs at the default input shape;
    the groups that stay whole (fixed), each with its reason."""
    from modelpress.compress.report import render_inspect

    graph = load_graph(ckpt, trust_pickle, input_shape, reporter(quiet or as_json))
    summary = graph.summary()
    if as_json:
        print_json(summary)
    else:
        extra = [t for t in (lone_blocks_table(summary["blocks"]), fixed_groups_table(summary["groups"])) if t]
        print_rich(render_inspect(summary), *extra)


def lone_blocks_table(blocks: list[dict]):  # noqa: ANN201 - rich renderable, or None
    """The blocks alone in their container, and whether pruning may replace them by an identity or keeps them
    (the other blocks are deleted from their container when pruning removes them)."""
    from rich.table import Table

    from modelpress.graph.model_graph import REMOVALS

    lone = [b for b in blocks if b.get("removal", "delete") != "delete"]
    if not lone:
        return None
    table = Table(title="blocks alone in their container")
    for c in ("block", "removal", "why"):
        table.add_column(c, overflow="fold")
    for b in lone:
        table.add_row(b["block"], b["removal"], REMOVALS[b["removal"]])
    return table


def fixed_groups_table(groups: list[dict]):  # noqa: ANN201 - rich renderable, or None
    """The groups pruning leaves whole, each with its reason (an output width, an input, a failed dry run)."""
    from rich.table import Table

    fixed = [g for g in groups if not g["prunable"]]
    if not fixed:
        return None
    table = Table(title="fixed groups (not offered to pruning)")
    for c in ("group", "kind", "units", "reason"):
        table.add_column(c, justify="right" if c == "units" else "left", overflow="fold")
    for g in fixed:
        table.add_row(g["name"], g["kind"], str(g["units"]), g.get("reason") or "-")
    return table
