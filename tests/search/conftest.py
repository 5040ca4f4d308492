"""The digits ViT (from the zoo cache) as a loadable ModelGraph, its data, and a tiny latency table (measured
once, then from the latency cache)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vit_graph(zoo_vit):  # noqa: ANN001
    import modelpress

    return modelpress.load(str(zoo_vit.path))


DATA = {"spec": "digits", "batch_size": 64, "n_calibration": 64, "n_evaluation": 200}


@pytest.fixture(scope="session")
def vit_data(vit_graph):  # noqa: ANN001
    from modelpress.data import load_data

    return load_data("digits", vit_graph.input_spec, batch_size=64, n_calibration=64, n_evaluation=200, seed=0)


@pytest.fixture(scope="session")
def vit_table(vit_graph):  # noqa: ANN001
    from modelpress.bench import build_latency_table, get_target

    return build_latency_table(vit_graph, get_target("ort-cpu", threads=1), grid="heads=1,4;mlp=64,256;embed=64",
                               rounds=2, runs=5, min_time_s=0.02, model_rounds=2, clock="cpu")  # cached under $MODELPRESS_CACHE


@pytest.fixture(scope="session")
def searched(vit_graph, vit_data, vit_table, tmp_path_factory):  # noqa: ANN001, ANN201
    """The searches the run tests share, run once per session:

    - ``full``: one uninterrupted search over predicted latency (two batches; the first holds 3 anchors and 3
      random sub-networks, so the second batch's predictors fit more than the anchors), its front then measured;
    - ``part``: the same search stopped after its first batch (the same measured precision table), then resumed
      to its end in a second call. Its front is not measured (``measure_front`` off, which the fingerprint
      leaves free): a predicted-only run, and the loop's records, which a predicted-latency search never
      times, are the uninterrupted run's if resuming works.

    Returns (folder, full summary, the stopped part's summary, the resumed part's summary, precision table)."""
    import json

    from modelpress.search.precision import PrecisionTable
    from tests.search.runs import search

    tmp = tmp_path_factory.mktemp("search")
    full = search(vit_graph, vit_data, vit_table, tmp, "full")
    table = PrecisionTable.from_dict(json.loads((tmp / "full" / "precision.json").read_text()))
    part = search(vit_graph, vit_data, vit_table, tmp, "part", precision_table=table, max_batches=1,
                  measure_front=False)
    resumed = search(vit_graph, vit_data, vit_table, tmp, "part", precision_table=table, resume=True,
                     measure_front=False)
    return tmp, full, part, resumed, table


@pytest.fixture(scope="session")
def full_ev(searched):  # noqa: ANN001, ANN201
    """The evaluator of the uninterrupted search's run folder, loaded once (tests only read and score with it)."""
    from modelpress.search.workers import load_evaluator

    return load_evaluator(searched[0] / "full")


@pytest.fixture(scope="session")
def measured(vit_graph, vit_data, tmp_path_factory):  # noqa: ANN001, ANN201
    """A search over quality and latency measured in ONNX Runtime (no latency model), in this process: the
    anchors (full, smallest) and one random sub-network, each exported, scored and timed."""
    from tests.search.runs import MEASURED, search

    tmp = tmp_path_factory.mktemp("measured")
    return tmp / "local", search(vit_graph, vit_data, None, tmp, "local", **MEASURED)
