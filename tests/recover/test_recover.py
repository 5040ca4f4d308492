"""The recover pass: recovers a pruned trained model label-free, resumes an interrupted run to the same weights,
runs inside a recipe, and refuses bad settings with short errors."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pytest
import torch

from modelpress.compress.pipeline import Pipeline
from modelpress.compress.recipe import Recipe
from modelpress.data import ClassificationTask, DataSplit, EmbeddingTask, TaskData, load_data
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context
from modelpress.progress import Reporter
from modelpress.prune.passes import MagnitudePrune
from modelpress.recover import Recover

T = TypeVar("T")
FAST = {"lr": 3e-3, "batch_size": 32}


@pytest.fixture(scope="module")
def digits(zoo_cnn):  # noqa: ANN001, ANN201
    """The trained digits CNN, its data (labelled), and the CNN with half its conv channels pruned."""
    graph = ModelGraph(zoo_cnn.module, zoo_cnn.input_spec, {"kind": "factory", "target": "digits"}, name="digits_cnn")
    data = load_data("digits", graph.input_spec, n_evaluation=None)
    ctx = Context(workdir="/nonexistent", task=ClassificationTask(), data=data, reference=graph)
    pruned = MagnitudePrune({"ratios": {"conv": 0.5}, "reconstruct": False}).apply(graph, ctx).graph
    return graph, data, pruned


def _ctx(tmp_path, graph: ModelGraph, data: TaskData, **kw) -> Context:  # noqa: ANN001
    return Context(workdir=tmp_path / "work", task=ClassificationTask(), data=data, reference=graph,
                   checkpoints=tmp_path / "checkpoints", **kw)


def _weights(graph: ModelGraph) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in graph.module.state_dict().items()}


def test_recover_in_a_recipe_restores_a_pruned_trained_cnn(tmp_path, digits) -> None:  # noqa: ANN001
    graph, data, _ = digits
    recipe = Recipe.from_dict({
        "name": "t", "export": {"optimize": "none"},
        "passes": [{"pass": "prune.magnitude", "ratios": {"conv": 0.5}, "reconstruct": False},
                   {"pass": "recover", "steps": 60, "evaluate": True, **FAST}],
    })
    ctx = _ctx(tmp_path, graph, data)
    report = Pipeline(recipe).run(graph, ctx, measure=False).report
    metrics = report["passes"][1]
    assert metrics["pass"] == "recover" and metrics["steps"] == 60 and metrics["data"] == "train"
    assert metrics["samples"] == len(data.train) and metrics["label_weight"] == 0.0  # label-free by default
    assert metrics["loss_end"] < 0.3 * metrics["loss_start"]
    # pruning half the channels leaves a near-random classifier; 60 distillation steps restore it
    assert metrics["quality_before"]["accuracy"] < 0.5
    assert metrics["quality_after"]["accuracy"] > 0.93 and metrics["quality_after"]["agreement"] > 0.93
    assert report["quality"]["after"]["accuracy"] > 0.93  # the exported ONNX model, scored in ONNX Runtime
    assert report["quality"]["before"]["accuracy"] > 0.98


class _CtrlCAt(Reporter):
    """A quiet reporter that sends Ctrl-C (SIGINT) to the process as the training reaches step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__(quiet=True)
        self.at = at

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        for i, item in enumerate(items):
            if i == self.at:
                signal.raise_signal(signal.SIGINT)
            yield item


def test_interrupted_recovery_resumes_to_the_same_weights(tmp_path, digits) -> None:  # noqa: ANN001
    graph, data, pruned = digits
    config = {"steps": 30, "checkpoint_every": 10, **FAST}
    whole = Recover(config).apply(pruned, _ctx(tmp_path / "a", graph, data))
    assert not whole.metrics["resumed"]

    with pytest.raises(KeyboardInterrupt):
        Recover(config).apply(pruned, _ctx(tmp_path / "b", graph, data, reporter=_CtrlCAt(17)))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    folders = list((tmp_path / "b" / "checkpoints").iterdir())
    assert len(folders) == 1 and [p.name for p in folders[0].iterdir()] == ["train-checkpoint.safetensors"]

    resumed = Recover(config).apply(pruned, _ctx(tmp_path / "b", graph, data))  # the same command again
    assert resumed.metrics["resumed"] and resumed.metrics["steps_this_run"] == 30 - 18
    a, b = _weights(whole.graph), _weights(resumed.graph)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _weights(pruned).items())  # it did train

    other = Recover({**config, "lr": 1e-3}).apply(pruned, _ctx(tmp_path / "b", graph, data))
    assert not other.metrics["resumed"]  # other settings: another checkpoint folder, a fresh start


def test_label_free_recovery_needs_no_labels_and_falls_back_to_calibration(tmp_path, digits) -> None:  # noqa: ANN001
    graph, data, pruned = digits
    unlabelled = DataSplit(batches=data.train.batches)
    no_labels = TaskData(calibration=data.calibration, evaluation=data.evaluation, description="d",
                         make_train=lambda: unlabelled)
    result = Recover({"steps": 20, **FAST}).apply(pruned, _ctx(tmp_path, graph, no_labels))
    assert result.metrics["steps"] == 20 and result.metrics["loss_end"] < result.metrics["loss_start"]
    with pytest.raises(ModelpressError, match="no labels"):
        Recover({"steps": 5, "label_weight": 0.5}).apply(pruned, _ctx(tmp_path, graph, no_labels))
    labelled = Recover({"steps": 5, "label_weight": 0.5}).apply(pruned, _ctx(tmp_path, graph, data))
    assert labelled.metrics["label_weight"] == 0.5

    logs: list[str] = []
    rep = Reporter(quiet=True)
    rep.log = logs.append  # type: ignore[method-assign]
    no_train = TaskData(calibration=data.calibration, evaluation=data.evaluation, description="cal only")
    result = Recover({"steps": 3}).apply(pruned, _ctx(tmp_path, graph, no_train, reporter=rep))
    assert result.metrics["data"] == "calibration" and result.metrics["samples"] == len(data.calibration)
    assert any("no train split" in line for line in logs)


def test_bad_settings_give_short_errors(tmp_path, digits) -> None:  # noqa: ANN001
    graph, data, pruned = digits
    for entry, message in [
        ({}, "give a budget"),
        ({"steps": 10, "warmup": 10}, "warmup"),
        ({"steps": 0}, "steps"),
        ({"minutes": -1}, "minutes"),
        ({"steps": 5, "loss": "cls"}, "loss"),
        ({"steps": 5, "label_weight": 2}, "label_weight"),
        ({"steps": 5, "epochs": 3}, "unknown key 'epochs'"),
    ]:
        with pytest.raises(ModelpressError, match=message):
            Recipe.from_dict({"name": "t", "passes": [{"pass": "recover", **entry}]})
    with pytest.raises(ModelpressError, match="apply to encoders"):
        Recover({"steps": 5, "loss": "tokens"}).apply(pruned, _ctx(tmp_path, graph, data))
    with pytest.raises(ModelpressError, match="original model"):
        Recover({"steps": 5}).apply(pruned, Context(workdir=tmp_path, task=ClassificationTask(), data=data))
    with pytest.raises(ModelpressError, match="training data"):
        Recover({"steps": 5}).apply(pruned, Context(workdir=tmp_path, task=ClassificationTask(), reference=graph))


def test_encoder_recovery_by_hidden_states(tmp_path) -> None:  # noqa: ANN001
    """A tiny BERT with half its MLP units pruned, distilled per token: per-token and pooled fidelity rise."""
    from tests.graph.models_zoo import fresh

    graph = fresh("bert")
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> DataSplit:
        ids = torch.randint(5, 500, (n, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[: n // 2, 8:] = 0  # padded samples: their padding must not count
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return DataSplit(batches=[{k: v[i : i + 16] for k, v in batch.items()} for i in range(0, n, 16)])

    train_split = split(128)
    data = TaskData(calibration=split(16), evaluation=split(32), description="random ids", make_train=lambda: train_split)
    ctx = Context(workdir=tmp_path, task=EmbeddingTask(), data=data, reference=graph, checkpoints=tmp_path / "c")
    pruned = MagnitudePrune({"ratios": {"mlp": 0.75, "head": 0.5}, "reconstruct": False}).apply(graph, ctx).graph

    def token_loss(g: ModelGraph) -> float:
        batch = data.evaluation.batches[0]
        with torch.no_grad():
            s, t = g.module(**batch).last_hidden_state, graph.module(**batch).last_hidden_state
        return EmbeddingTask.distillation("tokens").loss(s, t, batch).item()

    before = ctx.evaluate(pruned, torch_only=True).metrics["fidelity_mean"]
    result = Recover({"steps": 40, "loss": "tokens", "mse_weight": 0.1, "lr": 1e-3, "batch_size": 16}).apply(pruned, ctx)
    after = ctx.evaluate(result.graph, torch_only=True).metrics["fidelity_mean"]
    assert after > before + 0.5 * (1 - before)
    assert token_loss(result.graph) < 0.5 * token_loss(pruned)
    assert result.metrics["hidden_pairs"] == 2 and result.metrics["hidden_weight"] > 0  # both blocks matched
