"""Fake-quant models (W4A8, W8A8) save their weights as integer codes (two 4-bit codes per byte): a W4A8 file is
smaller than a W8A8 one, both smaller than the FP32 input (the tied LM head's own copy included), and the
reloaded model computes the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("precision", ["w4a8", "w8a8"])
def test_fake_quant_weights_are_saved_as_codes_and_reload_exactly(tmp_path, precision):
    import modelpress
    from modelpress.graph import InputSpec, ModelGraph
    from modelpress.models.saving import save
    from modelpress.quantize.fakequant import calibrate, wrap_model

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=64, use_cache=False)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "in")
    g = modelpress.load(tmp_path / "in")
    wrap_model(g.module, {"*": precision})
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 2048, size=(4, 32)))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calibrate(g.module, [batch])
    out = save(ModelGraph(g.module, InputSpec.from_dict(g.input_spec.to_dict()), g.source, edits=g.edits),
               tmp_path / precision)
    size_in = (tmp_path / "in" / "model.safetensors").stat().st_size
    size_out = (out / "model.safetensors").stat().st_size
    # the float embeddings stay; every Linear (the head's own copy too) is stored as codes
    assert size_out < (0.55 if precision == "w4a8" else 0.7) * size_in, (size_out, size_in)
    reloaded = modelpress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(**batch).logits, g.module(**batch).logits, rtol=0, atol=1e-5)
