"""The loss-aware GPTQ of a tied embedding / LM head (quantize/tied_rows.py)."""

from __future__ import annotations

import numpy as np
import torch

from modelpress.quantize.tied_rows import row_hessians, row_use
from modelpress.quantize.weight_only import WeightOnlyConfig, quantize_weights
from tests.quantize.test_weight_only import _gpt2


def _zipf_ids(seed: int, n: int = 8, seq: int = 32, vocab: int = 2048) -> dict[str, torch.Tensor]:
    """Token ids drawn as text draws them (Zipf's law): a few rows are looked up often, most never."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    ids = torch.from_numpy(rng.choice(vocab, size=(n, seq), p=p / p.sum()))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_row_use_counts_real_tokens_and_buckets_every_row_once():
    model = _gpt2(seed=1)
    batch = _zipf_ids(3, n=4, seq=16)
    batch["attention_mask"][1, 10:] = 0  # a padded row: its pads are neither looked up nor predicted
    use = row_use(model, model.transformer.wte, [batch], seed=0)
    valid = batch["attention_mask"] > 0
    assert use.positions == int(valid.sum())
    assert torch.equal(use.lookups, torch.bincount(batch["input_ids"][valid], minlength=2048).double())
    with torch.no_grad():
        p = torch.softmax(model(**batch).logits.double(), -1)[valid]
    torch.testing.assert_close(use.mass, (p * (1 - p)).sum(0), rtol=1e-4, atol=1e-9)
    assert torch.allclose(use.fisher, use.fisher.t()) and torch.linalg.eigvalsh(use.fisher).min() > -1e-9
    h = torch.eye(128, dtype=torch.float64)
    parts = list(row_hessians(h, use, buckets=4))
    cover = torch.stack([rows for rows, _ in parts]).sum(0)
    assert torch.equal(cover, torch.ones(2048, dtype=cover.dtype))  # every row in exactly one bucket
    assert torch.equal(parts[0][1], h) and not parts[0][0][use.lookups > 0].any()  # never looked up: h alone
    assert all(not torch.equal(hb, h) for _, hb in parts[1:])


def test_loss_aware_rows_lower_the_pairs_held_out_kl():
    """The tied pair's codes serve the embedding's look-ups too: weighing each row's look-ups into its Hessian
    lowers next-token KL on held-out ids against fitting the head alone (stdlib Llama, 4-bit pair: 2.0e-4 ->
    8.8e-5; the trained 1M GPT-2: 2.4e-4 -> 6.7e-5)."""
    calibration, held_out = [_zipf_ids(10 + i) for i in range(4)], _zipf_ids(99)
    with torch.no_grad():
        ref = torch.log_softmax(_gpt2(seed=1)(**held_out).logits.double(), -1)
    kl, tied = {}, {}
    for objective in ("loss", "head"):
        model = _gpt2(seed=1)
        cfg = WeightOnlyConfig(method="gptq", head="quantize", head_bits=4, tied_objective=objective,
                               policy={"transformer.h.*": "float"})
        tied[objective] = quantize_weights(model, calibration, cfg, blocks=[f"transformer.h.{i}" for i in range(4)]).tied
        assert model.lm_head.qweight is model.transformer.wte.qweight  # still one tensor
        with torch.no_grad():
            lp = torch.log_softmax(model(**held_out).logits.double(), -1)
        kl[objective] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert tied["loss"]["objective"].startswith("head inputs + embedding look-ups")
    assert 0 < tied["loss"]["rows_looked_up"] < 2048
    assert kl["loss"] < 0.9 * kl["head"], kl
