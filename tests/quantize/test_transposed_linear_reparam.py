"""GPT-2's Conv1D layers (transposed linears) read their LayerNorm like nn.Linear does: RepQ reparameterizes
those norms, and the QDQ export still matches the fake-quant model."""

from __future__ import annotations

from pathlib import Path

import torch

from modelpress.quantize.lowering import export_quantized
from modelpress.quantize.repq import RepQConfig, quantize_model


def test_gpt2_norms_are_reparameterized_into_their_conv1d_consumers(tmp_path: Path):
    from modelpress.passes import Context
    from tests.graph.models_zoo import fresh

    graph = fresh("gpt2")
    pairs = dict((n, c) for n, c, _ in graph.norm_consumers())
    assert pairs["transformer.h.0.ln_1"] == ["transformer.h.0.attn.c_attn"]
    assert pairs["transformer.h.1.ln_2"] == ["transformer.h.1.mlp.c_fc"]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]
    out = graph.copy()
    result = quantize_model(out.module, batches, graph.norm_consumers(), RepQConfig(reconstruction="none"))
    reparameterized = {grp.norm_name for grp in result.groups}
    assert {"transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1"} <= reparameterized
    exported = export_quantized(out, tmp_path / "gpt2.onnx", Context(workdir=tmp_path))
    assert exported.verification["min_cosine"] >= 0.99 and exported.integer_kernels > 0
