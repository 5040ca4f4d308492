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
