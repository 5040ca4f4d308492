"""Group saliency: the criteria equal their definitions, and they rank units by what removing them costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.data import load_data
from modelpress.data.saliency import group_saliency
from modelpress.data.tasks import ClassificationTask
from modelpress.graph import ModelGraph
from modelpress.graph.inputs import primary_output


@pytest.fixture(scope="module")
def vit(zoo_vit):  # noqa: ANN001
    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, batch_size=32, n_calibration=128, n_evaluation=None)
    return graph, data


def _unit_wg(graph: ModelGraph, group, grads: dict, unit: int) -> float:  # noqa: ANN001
    params = dict(graph.module.named_parameters())
    total = 0.0
    for (param, axis), idx in group.units[unit].items():
        if param not in params:
            continue
        w = params[param].detach().double().index_select(axis, torch.as_tensor(idx))
        g = grads[param].double().index_select(axis, torch.as_tensor(idx))
        total += float((w * g).sum())
    return total


def _batch_grads(graph: ModelGraph, data, labelled: bool, seed: int = 0) -> list[dict]:  # noqa: ANN001
    """Every parameter's gradient per batch, computed directly with autograd."""
    module = graph.module
    teacher = graph.copy().module
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    out = []
    for i, batch in enumerate(data.batches):
        x = batch["pixel_values"]
        logits = primary_output(module(pixel_values=x))
        if labelled:
            loss = torch.nn.functional.cross_entropy(logits, data.labels[i])
        else:
            with torch.no_grad():
                ref = primary_output(teacher(pixel_values=x))
            loss = task.fisher_loss(logits, ref, batch, gen)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
        out.append({k: torch.zeros_like(params[k]) if v is None else v for k, v in grads.items()})
    return out


@pytest.mark.parametrize("labelled", [False, True])
def test_hessian_equals_brute_force(vit, labelled: bool) -> None:  # noqa: ANN001
    graph, data = vit
    cal = data.calibration
    groups = [graph.group("head:vit.layers.1.attention"), graph.group("mlp:vit.layers.2.mlp")]
    scores = group_saliency(
        graph, "hessian", groups=groups, data=cal, task=ClassificationTask(), label_weight=1.0 if labelled else 0.0
    )
    taylor = group_saliency(
        graph, "taylor", groups=groups, data=cal, task=ClassificationTask(), label_weight=1.0 if labelled else 0.0
    )
    grads = _batch_grads(graph, cal, labelled)
    for g in groups:
        for unit in (0, g.size - 1):
            per_batch = np.array([_unit_wg(graph, g, gr, unit) for gr in grads])
            assert scores[g.name][unit] == pytest.approx(float((per_batch**2).mean()), rel=1e-6, abs=1e-15)
            assert taylor[g.name][unit] == pytest.approx(float(np.abs(per_batch).mean()), rel=1e-6, abs=1e-15)
    assert all(np.all(s >= 0) and np.any(s > 0) for s in scores.values())


def test_obd_uses_per_sample_squared_gradients(vit) -> None:  # noqa: ANN001
    graph, data = vit
    cal = data.calibration
    group = graph.group("mlp:vit.layers.0.mlp")
    scores = group_saliency(graph, "obd", groups=[group], data=cal, task=ClassificationTask(), label_weight=1.0,
                            obd_samples=12)
    module = graph.module
    params = dict(module.named_parameters())
    sq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    x, y = cal.batches[0]["pixel_values"], cal.labels[0]
    for i in range(12):
        loss = torch.nn.functional.cross_entropy(primary_output(module(pixel_values=x[i : i + 1])), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads, strict=True):
            if g is not None:
                sq[k] += g.double() ** 2
    for unit in (0, 5):
        expected = 0.0
        for (param, axis), idx in group.units[unit].items():
            w = params[param].detach().double().index_select(axis, torch.as_tensor(idx))
            f = (sq[param] / 12).index_select(axis, torch.as_tensor(idx))
            expected += 0.5 * float((w**2 * f).sum())
        assert scores[group.name][unit] == pytest.approx(expected, rel=1e-6)


def _loss_after(graph: ModelGraph, plan: list, data) -> float:  # noqa: ANN001
    g = graph.copy()
    g.remove_many(plan)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch, labels in zip(data.evaluation.batches, data.evaluation.labels, strict=True):
            logits = primary_output(g.module(pixel_values=batch["pixel_values"]))
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            n += len(labels)
    return total / n


@pytest.mark.parametrize("criterion", ["hessian"])
def test_lowest_saliency_costs_less_than_random(vit, criterion: str) -> None:  # noqa: ANN001
    graph, data = vit
    groups = [g for g in graph.groups if g.prunable and g.kind in ("mlp", "head")]
    scores = group_saliency(graph, criterion, groups=groups, data=data.calibration, task=ClassificationTask())
    fraction = {"mlp": 0.6, "head": 0.5}

    def plan_for(pick) -> list:  # noqa: ANN001
        return [(g.name, pick(g, int(fraction[g.kind] * g.size))) for g in groups]

    lowest = _loss_after(graph, plan_for(lambda g, n: np.argsort(scores[g.name], kind="stable")[:n]), data)
    # against the median of 8 random plans, not each: on the session-6 machine's digits ViT two of eight random
    # plans (0.85, 0.94) beat the Hessian plan (1.06; median 1.29; pruning the highest-saliency units: 1.68)
    randoms = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        randoms.append(_loss_after(graph, plan_for(lambda g, n, rng=rng: rng.permutation(g.size)[:n]), data))
    assert lowest < np.median(randoms), (criterion, lowest, randoms)


def test_saliency_is_deterministic_and_checks_its_inputs(vit) -> None:  # noqa: ANN001
    from modelpress.errors import ModelpressError

    graph, data = vit
    group = [graph.group("mlp:vit.layers.3.mlp")]
    a = group_saliency(graph, "hessian", groups=group, data=data.calibration, task=ClassificationTask(), seed=3)
    b = group_saliency(graph, "hessian", groups=group, data=data.calibration, task=ClassificationTask(), seed=3)
    np.testing.assert_array_equal(a[group[0].name], b[group[0].name])
    with pytest.raises(ModelpressError, match="unknown saliency"):
        group_saliency(graph, "fisher", groups=group)
    with pytest.raises(ModelpressError, match="needs data"):
        group_saliency(graph, "hessian", groups=group, task=ClassificationTask())


def test_text_backward_holds_a_token_budget_of_activations(monkeypatch) -> None:  # noqa: ANN001
    """Text batches are pulled back at most MICRO_TOKENS tokens at a time (BERT-base at 64 tokens: 2 samples, not
    4), short sequences still 4 samples; the scores are the batch's either way (float32 round-off)."""
    import transformers as T

    from modelpress.data import infer_task, probes
    from modelpress.data.saliency import MICRO_BATCH, MICRO_TOKENS
    from modelpress.data.sources import DataSplit
    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    graph = ModelGraph(m, hf_input_spec(m), {"kind": "hf", "class": "BertModel", "config": m.config.to_dict()}, name="t")
    task = infer_task(graph.input_spec, m)
    used: list[int | None] = []
    split_backward = probes._split_backward

    def spy(*args):  # noqa: ANN002, ANN202
        used.append(args[-1])
        return split_backward(*args)

    monkeypatch.setattr(probes, "_split_backward", spy)
    for seq, micro in ((MICRO_TOKENS // MICRO_BATCH, MICRO_BATCH), (64, MICRO_TOKENS // 64)):
        ids = torch.randint(0, 100, (8, seq), generator=torch.Generator().manual_seed(seq))
        data = DataSplit([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": 0 * ids}])
        scores = group_saliency(graph, "hessian", data=data, task=task, reference=m)
        assert used[-1] == micro
        whole = group_saliency(graph, "hessian", data=data, task=task, reference=m, micro_batch=None)
        for name, s in scores.items():
            np.testing.assert_allclose(s, whole[name], rtol=1e-3, atol=1e-9)
