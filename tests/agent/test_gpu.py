"""The CUDA provider measured for real, locally and through an agent serving it (needs a GPU: marked gpu and
skipped without CUDAExecutionProvider). The GPU benchmark: `python benchmarks/targets.py --parts gpu`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from modelpress.bench import get_target, measure
from tests.agent.conftest import FAST

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="needs onnxruntime-gpu and a CUDA GPU"),
]


def test_cuda_through_an_agent_matches_local_cuda_and_torch(fresh_agent, mlp_files):
    import torch

    from tests.agent.conftest import _mlp

    files, spec = mlp_files
    agent = fresh_agent(1, "--providers", "CUDAExecutionProvider,CPUExecutionProvider")
    from modelpress.bench.remote import resolve

    target = resolve(get_target(agent.target))
    assert target.providers[0] == "CUDAExecutionProvider"
    report = measure({"wide": files["wide"]}, spec, target, batch_sizes=[1, 8], memory=False, **FAST)
    assert report.target["providers"][0] == "CUDAExecutionProvider"
    cuda = get_target("ort-cuda")
    feeds = {(b, None): spec.make(b) for b in (1, 8)}
    from modelpress.timing import onnx_digests, onnx_runner

    assert report.variants["wide"].output_digests == onnx_digests(files["wide"], cuda, feeds)
    out = onnx_runner(files["wide"], cuda, "wide")(feeds[(8, None)])[0]
    with torch.inference_mode():
        ref = _mlp(256)(torch.from_numpy(feeds[(8, None)]["x"])).numpy()
    assert np.allclose(out, ref, atol=1e-3, rtol=1e-3)
