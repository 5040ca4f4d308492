"""The digits-ViT searches the search tests share (run once per session by tests/search/conftest.py)."""

from __future__ import annotations

import torch

OBJ = ["quality", "latency", "size"]
SPACE = {"head_fractions": (0.5, 1.0), "mlp_fractions": (0.25, 0.5, 1.0)}
# quality and latency measured in ONNX Runtime (no latency model): the anchors (full, smallest) and one random
# sub-network, each exported, scored and timed
MEASURED = dict(objectives=["quality", "latency"], latency="measured", latency_batch=8, budget=3, batch_size=3,
                space={**SPACE, "precisions": ("float",)})


def context(graph, data, tmp_path):  # noqa: ANN001, ANN201
    from modelpress.bench import get_target
    from modelpress.data.tasks import ClassificationTask
    from modelpress.passes import Context

    return Context(workdir=tmp_path / "w", task=ClassificationTask(), data=data, reference=graph,
                   target=get_target("ort-cpu", threads=1), seed=0)


def search(graph, data, table, tmp_path, run, precision_table=None, resume=False, max_batches=None, **kw):  # noqa: ANN001, ANN201
    """A search of the digits ViT into ``tmp_path / run``: three objectives, predicted latency, budget 10 in
    batches of 6 (3 anchors and 3 random sub-networks first, so the second batch's predictors fit more than
    the anchors), unless ``kw`` says otherwise."""
    from modelpress.search.run import run_search
    from modelpress.search.spec import SearchSpec

    torch.set_num_threads(1)
    opts = dict(objectives=OBJ, budget=10, batch_size=6, latency="predicted", generations=6, pop_size=12,
                uniform=(), space=SPACE, rounds=2)
    opts.update(kw)
    return run_search(graph, context(graph, data, tmp_path), tmp_path / run, SearchSpec(**opts), latency_table=table,
                      precision_table=precision_table, resume=resume, max_batches=max_batches)
