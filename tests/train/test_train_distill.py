"""Hidden-state distillation and the cached teacher: the loss is zero on the teacher itself, trains the width
map, matches blocks through the lineage; the cache gives the live teacher's targets, never re-runs it, stays
in its budget and resumes to the same weights; hidden distillation lowers held-out hidden-state error."""

from __future__ import annotations

import pytest
import torch

from modelpress.data import ClassificationTask, DataSplit, EmbeddingTask
from modelpress.errors import ModelpressError
from modelpress.train import TrainConfig, hidden_distance, hidden_pairs, train
from modelpress.train.batches import Samples
from modelpress.train.distill import HiddenMaps, capture, hidden_loss
from modelpress.train.teacher import CachedTeacher, LiveTeacher
from tests.graph.models_zoo import fresh

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
TOKENS = EmbeddingTask.distillation("tokens")  # per-token targets: the padding path of the cache counts


def _text(n: int, seed: int = 0, batch: int = 16) -> DataSplit:
    """Random token ids of varied lengths (right-padded, so every batch trims to its own length)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (n, 12), generator=gen)
    lengths = torch.randint(3, 13, (n,), generator=gen)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return DataSplit(batches=[{k: v[i : i + batch] for k, v in data.items()} for i in range(0, n, batch)])


def _states(graph, paths: list[str], batch: dict) -> list[torch.Tensor]:  # noqa: ANN001
    with capture(graph.module, paths) as found:
        graph.module(**batch)
    return [found[p] for p in paths]


def test_hidden_loss_is_zero_on_the_teacher_and_trains_a_width_map() -> None:
    teacher = fresh("bert")
    batch = _text(8).batches[0]
    pairs = hidden_pairs(teacher.copy(), teacher)
    assert pairs == [("encoder.layer.0", "encoder.layer.0"), ("encoder.layer.1", "encoder.layer.1")]
    states = _states(teacher, [t for _, t in pairs], batch)
    maps = HiddenMaps(pairs, states, states)
    assert maps.axes == [None, None] and not list(maps.parameters())
    assert hidden_loss(maps, states, [s.detach().clone() for s in states], batch).item() == 0.0

    vit = fresh("vit")  # residual width 64 -> 48: a learned map per block, trained with the student
    student = vit.copy()
    embedding = next(g for g in student.groups if g.kind == "embedding")
    student.remove(embedding, list(range(16)), force=True)
    pairs = hidden_pairs(student, vit)
    assert len(pairs) == 2
    x = {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    s_states, t_states = _states(student, [s for s, _ in pairs], x), _states(vit, [t for _, t in pairs], x)
    maps = HiddenMaps(pairs, s_states, t_states)
    assert maps.axes == [2, 2] and maps.maps["0"].weight.shape == (64, 48)
    loss = hidden_loss(maps, s_states, [t.detach() for t in t_states], x)
    loss.backward()
    assert loss.item() > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in maps.parameters())
    block = student.module.get_submodule(pairs[0][0])
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in block.parameters())
    before = loss.item()
    maps.fit([s.detach() for s in s_states], [t.detach() for t in t_states], None)  # least squares: no worse
    assert hidden_loss(maps, s_states, t_states, x).item() < before


def test_pairs_follow_removed_blocks_to_the_original() -> None:
    teacher = fresh("bert")
    student = teacher.copy()
    student.remove_block("encoder.layer.0")
    assert hidden_pairs(student, teacher) == [("encoder.layer.0", "encoder.layer.1")]


def _mlp_pruned(teacher):  # noqa: ANN001, ANN202
    student = teacher.copy()
    for group in student.groups_of_kind("mlp"):
        student.remove(group, list(range(0, group.size, 2)))
    return student


def _run(teacher, student, data, steps: int, **config):  # noqa: ANN001, ANN003, ANN202
    cfg = {"steps": steps, "lr": 3e-3, "batch_size": 8, "log_every": 1, "dropout": False, **config}
    pairs = hidden_pairs(student, teacher) if cfg.get("hidden_weight") else None
    return train(student.module, data, task=TOKENS, teacher=teacher.module, config=TrainConfig(**cfg),
                 input_names=NAMES, hidden=pairs)


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_cached_teacher_gives_the_live_teachers_loss(hidden_weight: float) -> None:
    teacher, data = fresh("bert"), _text(40)
    steps = 15  # 5 batches an epoch: 3 epochs
    losses = {}
    for cache in ("off", "float32", "float16"):
        student = _mlp_pruned(teacher)
        result = _run(teacher, student, data, steps, teacher_cache=cache, hidden_weight=hidden_weight)
        losses[cache] = torch.tensor([v for _, v in result.losses], dtype=torch.float64)
    live, f32, f16 = losses["off"], losses["float32"], losses["float16"]
    assert torch.equal(f32[:5], live[:5])  # the first epoch runs the teacher on the same batches: exact
    torch.testing.assert_close(f32, live, rtol=1e-5, atol=1e-7)  # later: other padding, float rounding only
    torch.testing.assert_close(f16, live, rtol=1e-2, atol=2e-4)
    assert not torch.equal(f16, live)  # float16 is really stored


def test_cache_runs_the_teacher_once_per_sample_within_its_budget() -> None:
    teacher, data = fresh("bert"), _text(40)
    samples = Samples(data)
    paths = [t for _, t in hidden_pairs(teacher.copy(), teacher)]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    live = LiveTeacher(teacher.module, NAMES, paths, torch.device("cpu"))
    cache = CachedTeacher(live, samples, order, 8, dtype="float32", budget_bytes=2**30)
    for epoch in range(3):
        perm = order if epoch == 0 else torch.randperm(40, generator=torch.Generator().manual_seed(epoch + 5))
        for k in range(5):
            index = perm[k * 8 : (k + 1) * 8]
            batch = samples.batch(index)
            out, hidden = cache(index, batch)
            ref_out, ref_hidden = LiveTeacher(teacher.module, NAMES, paths, torch.device("cpu"))(batch)
            valid = batch["attention_mask"].bool()
            for a, b in zip([out, *hidden], [ref_out, *ref_hidden], strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-6)
    assert live.samples_run == 40 and live.calls == 5  # the first epoch's batches, never again

    # a budget for about half the samples: those the first epoch visits first are kept, the rest run live
    lengths = samples.tensors["attention_mask"].sum(dim=1)
    per_token = 64 * (1 + len(paths)) * 2
    budget = int(lengths[order[:20]].sum()) * per_token
    live = LiveTeacher(teacher.module, NAMES, paths, torch.device("cpu"))
    cache = CachedTeacher(live, samples, order, 8, dtype="float16", budget_bytes=budget)
    assert torch.equal(cache.eligible.nonzero().flatten().sort().values, order[:20].sort().values)
    for _ in range(2):
        for k in range(5):
            index = order[k * 8 : (k + 1) * 8]
            cache(index, samples.batch(index))
    assert cache.bytes <= budget and len(cache.store) == 20
    assert live.samples_run == 20 + 2 * 20  # 20 cached once, 20 run live in each of the two epochs


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_resumed_with_cache_and_maps_equals_uninterrupted(tmp_path, family: str) -> None:  # noqa: ANN001
    """Stopped in the second epoch and resumed (the cache starts empty and is refilled on the first epoch's
    batches; the width maps come from the checkpoint): the same weights as an uninterrupted run. ViT: residual
    width pruned (learned maps); BERT: padded text of varied lengths (batch composition changes the padding)."""
    teacher = fresh(family)
    student = teacher.copy()
    if family == "vit":
        x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        data = DataSplit(batches=[{"pixel_values": x[i : i + 8]} for i in range(0, 24, 8)])
        task, names = ClassificationTask(), ["pixel_values"]
        student.remove(next(g for g in student.groups if g.kind == "embedding"), list(range(16)), force=True)
    else:
        data, task, names = _text(24, seed=3, batch=8), TOKENS, NAMES
        student = _mlp_pruned(teacher)
    pairs = hidden_pairs(student, teacher)
    base = {"lr": 3e-3, "batch_size": 6, "schedule_steps": 12, "dropout": False, "hidden_weight": 1.0,
            "teacher_cache": "float16", "checkpoint_every": 100}

    def run(module, steps: int, resume: bool, folder) -> None:  # noqa: ANN001
        train(module, data, task=task, teacher=teacher.module, hidden=pairs, resume=resume,
              config=TrainConfig(steps=steps, checkpoint_dir=folder, **base), input_names=names)

    whole, parts = student.copy().module, student.copy().module
    run(whole, 12, False, tmp_path / "a")
    run(parts, 7, False, tmp_path / "b")  # stops in the second epoch (4 batches an epoch)
    run(parts, 12, True, tmp_path / "b")  # resumes with an empty cache: refilled on the same batches
    for (k, a), (_, b) in zip(whole.state_dict().items(), parts.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_hidden_distillation_lowers_held_out_hidden_error(zoo_vit) -> None:  # noqa: ANN001
    """The trained digits ViT with 3/4 of its MLP units gone, recovered 40 steps on digits: the held-out
    hidden-state error falls, and falls further than by output distillation alone."""
    import modelpress
    from modelpress.data import load_data

    teacher = modelpress.load(str(zoo_vit.path))
    data = load_data("digits", teacher.input_spec, None, seed=0)
    pruned = teacher.copy()
    for group in pruned.groups_of_kind("mlp"):
        pruned.remove(group, list(range(group.size // 4, group.size)))
    pairs = hidden_pairs(pruned, teacher)
    held_out = data.evaluation.batches[:4]

    def error(graph) -> float:  # noqa: ANN001
        return sum(hidden_distance(graph.module, teacher.module, pairs, held_out, ["pixel_values"]))

    after = {}
    for weight in (0.0, 1.0):
        student = pruned.copy()
        config = TrainConfig(steps=40, lr=1e-3, batch_size=32, dropout=False, hidden_weight=weight)
        train(student.module, data.calibration, task=ClassificationTask(), teacher=teacher.module, config=config,
              input_names=["pixel_values"], hidden=pairs if weight else None)
        after[weight] = error(student)
    before = error(pruned)
    assert after[1.0] < 0.5 * before
    assert after[1.0] < 0.7 * after[0.0]


def test_hidden_weight_needs_pairs() -> None:
    teacher = fresh("bert")
    with pytest.raises(ModelpressError, match="hidden_weight"):
        train(teacher.copy().module, _text(8), task=TOKENS, teacher=teacher.module,
              config=TrainConfig(steps=1, hidden_weight=1.0), input_names=NAMES)


def test_cache_probe_fits_windows_that_fill_every_position() -> None:
    """LM windows as long as the model's positions (GPT-2's ``n_positions``): the cache's probe must not run
    a longer one (it indexed past the position embedding), and still finds the logits per token."""
    transformers = pytest.importorskip("transformers")
    from modelpress.data import LanguageModelTask

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    student = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    data = DataSplit(batches=[{"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, 8, dtype=torch.long)}
                              for i in (0, 8)])
    config = TrainConfig(steps=3, lr=1e-3, batch_size=8, teacher_cache="float32", dropout=False)
    result = train(student, data, task=LanguageModelTask(), teacher=teacher, config=config,
                   input_names=["input_ids", "attention_mask"])
    assert result.steps == 3
    samples = Samples(data)
    live = LiveTeacher(teacher, ["input_ids", "attention_mask"], [], torch.device("cpu"))
    cache = CachedTeacher(live, samples, torch.arange(16), 8, dtype="float32", budget_bytes=2**30)
    assert cache.layout[0][:2] == (True, 50)  # the logits: per token, 50 values each
