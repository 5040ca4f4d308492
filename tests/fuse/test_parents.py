"""Fusion of genuinely different parents: three independently drawn models (each weight picks its parent, in
the fused model and in the ensemble), parents of other widths (fusion as compression), parents whose head
widths differ (a short error), plans that did not converge, and activation rows: padding never counts,
batches padded to different lengths fuse, ``tokens="first"`` keeps working with fewer samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ot")

from modelpress.errors import ModelpressError  # noqa: E402
from modelpress.fuse import Ensemble, FusionSettings, fuse  # noqa: E402
from modelpress.fuse.features import ActivationFeatures  # noqa: E402
from modelpress.fuse.spaces import build_spaces  # noqa: E402
from modelpress.fuse.transport import couple, marginal_error  # noqa: E402
from tests.fuse.tiny import batches, digits_vit  # noqa: E402
from tests.graph.models_zoo import fresh  # noqa: E402


@pytest.fixture(scope="module")
def parents():
    return [digits_vit(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def x(parents):
    return parents[0].example_inputs(64, seed=9)


def mean_gap(a, b, x) -> float:  # noqa: ANN001
    return float((a.forward(x) - b.forward(x)).abs().mean())


def test_each_of_three_different_parents_is_picked_by_its_weight(parents, x):
    outs = [p.forward(x) for p in parents]
    assert min(float((outs[i] - outs[j]).abs().max()) for i in range(3) for j in range(i)) > 0.1
    names = list(parents[0].input_spec.names)
    for i in range(3):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 1.0
        f = fuse(parents, FusionSettings(cost="acts", samples=24, weights=weights), batches(parents[0]))
        torch.testing.assert_close(f.graph.forward(x), outs[i], atol=1e-5, rtol=1e-5)  # parent i, permuted
        ensemble = Ensemble([p.module for p in parents], names, True, f.output_maps, f.weights)
        torch.testing.assert_close(ensemble(**x), torch.log_softmax(outs[i], -1), atol=1e-5, rtol=1e-5)
    f = fuse(parents, FusionSettings(cost="acts", samples=24), batches(parents[0]))
    assert f.weights == pytest.approx([1 / 3] * 3)
    assert min(mean_gap(f.graph, p, x) for p in parents) > 0.01  # equal weights: none of the three


def test_a_wider_parent_fuses_into_the_anchors_narrower_widths(x):
    wide = digits_vit(4, heads=4)
    narrow = wide.copy()
    narrow.remove_many([(g.name, list(range(0, g.size, 2))) for g in narrow.groups if g.kind in ("mlp", "head")])
    narrow.name = "narrow"
    for cost, factor in (("weights", 0.85), ("acts", 0.95)):
        f = fuse([narrow, wide], FusionSettings(cost=cost, samples=24, weights=[0.0, 1.0]), batches(wide))
        assert [(b["heads"], b["mlp"]) for b in f.graph.summary()["blocks"]] == [(2, 32), (2, 32)]
        assert f.vanilla is None
        # the wide parent compressed into the narrow units is closer to it than the pruned anchor
        assert mean_gap(f.graph, wide, x) < factor * mean_gap(narrow, wide, x), cost


def test_parents_whose_heads_differ_in_width_are_a_short_error(parents):
    thin = parents[1].copy()
    thin.remove_many([(g.name, list(range(8))) for g in thin.groups if g.kind == "head_dim"])
    with pytest.raises(ModelpressError, match=r"differ: head width of .*: 8 vs 16"):
        fuse([parents[0], thin], FusionSettings(cost="weights"))


def test_a_plan_that_did_not_converge_is_a_short_error():
    cost = np.random.default_rng(0).random((12, 9))
    assert marginal_error(couple(cost, "soft", 0.05)) < 1e-6
    with pytest.raises(ModelpressError, match="(?s)Sinkhorn plan did not converge.*raise reg"):
        couple(cost, "soft", 0.001, max_iter=3)


def _padded(batch: dict, extra: int) -> dict:
    """``batch`` with ``extra`` padding positions (random token ids, attention mask 0) at the end."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad_ids = torch.randint(5, 400, (ids.shape[0], extra), generator=torch.Generator().manual_seed(extra))
    out = {"input_ids": torch.cat([ids, pad_ids], 1), "attention_mask": torch.cat([mask, torch.zeros_like(pad_ids)], 1)}
    if "token_type_ids" in batch:
        out["token_type_ids"] = torch.cat([batch["token_type_ids"], torch.zeros_like(pad_ids)], 1)
    return out


def test_padding_never_counts_and_lengths_may_differ():
    bert = fresh("bert")
    batch = {k: torch.as_tensor(v) for k, v in bert.example_inputs(6, 8, seed=1).items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    spaces = build_spaces(bert)
    plain = ActivationFeatures(bert, spaces, [batch], max_rows=10_000)
    padded = ActivationFeatures(bert, spaces, [_padded(batch, 4)], max_rows=10_000)
    assert plain.rows.keys() == padded.rows.keys()
    for key, rows in plain.rows.items():
        torch.testing.assert_close(padded.rows[key], rows, atol=1e-5, rtol=1e-5, msg=str(key))
    other = {k: torch.as_tensor(v) for k, v in bert.example_inputs(6, 8, seed=2).items()}
    other["attention_mask"] = torch.ones_like(other["input_ids"])
    twin = bert.copy()
    f = fuse([bert, twin], FusionSettings(cost="acts", samples=12), [batch, _padded(other, 3)])
    sa, sb = f.graph.state(), bert.state()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].is_floating_point()) == 0.0


def test_first_tokens_with_fewer_samples_than_asked(parents):
    vit = parents[0]
    spaces = build_spaces(vit)
    feats = ActivationFeatures(vit, spaces, batches(vit, n=3, size=8), tokens="first")
    token_level = [k for k in feats.rows if k[0].endswith(("q_proj", "fc1"))]
    assert token_level and all(feats.rows[k].shape[0] == 24 for k in token_level)  # one row per sample
    settings = FusionSettings(cost="acts", tokens="first", samples=200, weights=[0.0, 1.0])
    f = fuse(parents[:2], settings, batches(vit))
    x = vit.example_inputs(4, seed=9)
    torch.testing.assert_close(f.graph.forward(x), parents[1].forward(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_minilm_fuses_with_itself_on_activations(minilm):
    """The default text model with its default activation costs: calibration batches padded to different lengths
    (the packaged sentences, 4 a batch) fuse it back exactly."""
    from modelpress.data import load_data

    data = load_data(None, minilm.input_spec, minilm.tokenizer, batch_size=4, n_calibration=8)
    calibration = [dict(b) for b in data.calibration.batches]
    assert len({b["input_ids"].shape[1] for b in calibration}) > 1
    f = fuse([minilm, minilm.copy()], FusionSettings(cost="acts", samples=8), calibration)
    sa, sb = f.graph.state(), minilm.state()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].is_floating_point()) == 0.0
