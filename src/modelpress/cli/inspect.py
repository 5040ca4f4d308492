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
    """Per block: heads, head dim, MLP width; embedding width; parameters; MACs at the default input shape."""
    from modelpress.compress.report import render_inspect

    graph = load_graph(ckpt, trust_pickle, input_shape, reporter(quiet or as_json))
    summary = graph.summary()
    if as_json:
        print_json(summary)
    else:
        print_rich(render_inspect(summary))
