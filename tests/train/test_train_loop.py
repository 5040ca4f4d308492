"""The training loop: learns, deterministic, budgets, resume (after a stop or Ctrl-C) equals an uninterrupted run."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from modelpress.data import ClassificationTask, DataSplit, EmbeddingTask
from modelpress.errors import ModelpressError
from modelpress.train import CHECKPOINT_NAME, TrainConfig, load_checkpoint, train


def _mlp(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 5))


def _data(n: int = 50, batch: int = 16, labels: bool = False) -> DataSplit:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, 8, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return DataSplit(
        batches=[{"x": x[i : i + batch]} for i in range(0, n, batch)],
        labels=[y[i : i + batch] for i in range(0, n, batch)] if labels else None,
    )


def _jitter(batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {**batch, "x": batch["x"] + 0.01 * torch.randn(batch["x"].shape, generator=gen)}


def _kl_to_teacher(student: nn.Module, teacher: nn.Module, data: DataSplit) -> float:
    x = torch.cat([b["x"] for b in data.batches])
    with torch.no_grad():
        return ClassificationTask().loss(student.eval()(x), teacher.eval()(x), {}).item()


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_distillation_lowers_the_loss() -> None:
    teacher, student, data = _mlp(0), _mlp(1), _data()
    before = _kl_to_teacher(student, teacher, data)
    config = TrainConfig(steps=80, lr=1e-2, warmup_steps=5, batch_size=8, log_every=10)
    result = train(student, data, task=ClassificationTask(), teacher=teacher, config=config)
    assert result.steps == result.steps_this_run == 80 and result.stopped_by == "steps"
    assert [s for s, _ in result.losses] == list(range(10, 81, 10))
    assert result.losses[-1][1] < 0.5 * result.losses[0][1]
    assert _kl_to_teacher(student, teacher, data) < 0.3 * before
    assert not result.resumed and result.checkpoint is None and result.seconds > 0


def test_labels_alone_train_a_classifier() -> None:
    student, data = _mlp(1), _data(labels=True)
    config = TrainConfig(steps=150, lr=2e-2, batch_size=10, label_weight=1.0, schedule="constant")
    result = train(student, data, task=ClassificationTask(), config=config)
    x, y = torch.cat([b["x"] for b in data.batches]), torch.cat(data.labels)
    with torch.no_grad():
        accuracy = (student(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9 and result.final_loss < result.losses[0][1]


def test_same_seed_same_weights_other_seed_others() -> None:
    teacher, data = _mlp(0), _data()
    runs = []
    for seed in (7, 7, 8):
        student = _mlp(1, dropout=0.2)
        config = TrainConfig(steps=20, lr=1e-2, batch_size=8, seed=seed)
        train(student, data, task=ClassificationTask(), teacher=teacher, config=config, augment=_jitter)
        runs.append(student)
    _assert_same_weights(runs[0], runs[1])
    assert not torch.equal(runs[0][0].weight, runs[2][0].weight)


def test_training_leaves_modes_and_caller_rng_alone() -> None:
    teacher, student = _mlp(0), _mlp(1, dropout=0.5)
    teacher.train()
    student.eval()
    state = torch.random.get_rng_state()
    train(student, _data(), task=ClassificationTask(), teacher=teacher, config=TrainConfig(steps=3))
    assert teacher.training and not student.training
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("schedule", ["cosine", "one_cycle", "constant"])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, schedule) -> None:  # noqa: ANN001
    teacher, data = _mlp(0), _data(n=50)
    common = dict(lr=1e-2, batch_size=8, schedule=schedule, warmup_steps=4, checkpoint_every=5, log_every=3)
    if schedule != "constant":
        common["schedule_steps"] = 23  # the schedule spans the whole training, whatever each part's budget

    def run(steps: int, folder: str, resume: bool = False) -> tuple[nn.Module, object]:
        student = _mlp(1, dropout=0.2)  # dropout: the global RNG must resume too
        config = TrainConfig(steps=steps, checkpoint_dir=tmp_path / folder, **common)
        result = train(
            student,
            data,
            task=ClassificationTask(),
            teacher=teacher,
            config=config,
            resume=resume,
            augment=_jitter,
        )
        return student, result

    whole, whole_result = run(23, "whole")
    part, first = run(11, "parts")  # stops mid-epoch (50 samples, batches of 8), between two checkpoints
    assert first.steps == 11 and first.checkpoint == tmp_path / "parts" / CHECKPOINT_NAME
    assert not torch.equal(part[0].weight, whole[0].weight)
    resumed, second = run(23, "parts", resume=True)
    assert second.resumed and second.steps == 23 and second.steps_this_run == 12
    _assert_same_weights(resumed, whole)
    assert second.losses == whole_result.losses  # the loss log continues across the resume
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [CHECKPOINT_NAME]  # no temporary files


def test_ctrl_c_writes_a_checkpoint_to_resume_from(tmp_path) -> None:  # noqa: ANN001
    class Interrupted(nn.Module):
        """Sends itself SIGINT (Ctrl-C) during the forward pass of one step."""

        def __init__(self, at_call: int | None) -> None:
            super().__init__()
            self.net, self.calls, self.at_call = _mlp(1, dropout=0.2), 0, at_call

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == self.at_call:
                signal.raise_signal(signal.SIGINT)
            return self.net(x)

    teacher, data = _mlp(0), _data()
    config = TrainConfig(steps=20, lr=1e-2, batch_size=8, checkpoint_every=50, checkpoint_dir=tmp_path)
    whole = Interrupted(None)
    train(
        whole,
        data,
        task=ClassificationTask(),
        teacher=teacher,
        config=config.model_copy(update={"checkpoint_dir": None}),
    )

    student = Interrupted(at_call=8)
    with pytest.raises(KeyboardInterrupt):
        train(student, data, task=ClassificationTask(), teacher=teacher, config=config)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.meta["step"] == 8  # the step Ctrl-C arrived in was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    fresh = Interrupted(None)  # a new process would start from fresh weights: the checkpoint restores them
    result = train(fresh, data, task=ClassificationTask(), teacher=teacher, config=config, resume=True)
    assert result.resumed and result.steps == 20
    _assert_same_weights(fresh, whole)


def test_resume_refuses_another_recipe_or_data(tmp_path) -> None:  # noqa: ANN001
    teacher, data = _mlp(0), _data()
    config = TrainConfig(steps=4, schedule="constant", checkpoint_dir=tmp_path)
    train(_mlp(1), data, task=ClassificationTask(), teacher=teacher, config=config)
    with pytest.raises(ModelpressError, match="lr"):
        train(
            _mlp(1),
            data,
            task=ClassificationTask(),
            teacher=teacher,
            config=config.model_copy(update={"lr": 1.0}),
            resume=True,
        )
    with pytest.raises(ModelpressError, match="samples"):
        train(_mlp(1), _data(n=40), task=ClassificationTask(), teacher=teacher, config=config, resume=True)
    wider = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 5))
    with pytest.raises(ModelpressError, match="does not fit"):
        train(wider, data, task=ClassificationTask(), teacher=teacher, config=config, resume=True)
    result = train(_mlp(1), data, task=ClassificationTask(), teacher=teacher, config=config, resume=True)
    assert result.resumed and result.steps_this_run == 0  # already at its budget


def test_resume_refuses_another_loss(tmp_path) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 3, 4, generator=gen)} for _ in range(2)]
    teacher, config = nn.Linear(4, 4), TrainConfig(steps=2, schedule="constant", checkpoint_dir=tmp_path)
    train(nn.Linear(4, 4), DataSplit(batches=batches), task=EmbeddingTask(), teacher=teacher, config=config)
    with pytest.raises(ModelpressError, match="another loss"):
        train(nn.Linear(4, 4), DataSplit(batches=batches), task=EmbeddingTask.distillation("tokens"),
              teacher=teacher, config=config, resume=True)


def test_dropout_off_trains_in_eval_mode() -> None:
    seen: list[bool] = []
    student = _mlp(1, dropout=0.5)
    student.register_forward_hook(lambda m, i, o: seen.append(m.training))
    config = TrainConfig(steps=3, schedule="constant", dropout=False)
    train(student, _data(), task=ClassificationTask(), teacher=_mlp(0), config=config)
    assert seen == [False] * 3 and student.training  # restored to the mode it came in
    train(student, _data(), task=ClassificationTask(), teacher=_mlp(0), config=config.model_copy(update={"dropout": True}))
    assert seen[3:] == [True] * 3


def test_resume_without_checkpoint_starts_afresh(tmp_path) -> None:  # noqa: ANN001
    config = TrainConfig(steps=3, checkpoint_dir=tmp_path / "new")
    result = train(_mlp(1), _data(), task=ClassificationTask(), teacher=_mlp(0), config=config, resume=True)
    assert not result.resumed and result.steps == 3 and (tmp_path / "new" / CHECKPOINT_NAME).is_file()


def test_seconds_budget_stops() -> None:
    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.02)
            return self.net(x)

    config = TrainConfig(seconds=0.3, schedule="constant", batch_size=8)
    start = time.perf_counter()
    result = train(Slow(), _data(), task=ClassificationTask(), teacher=_mlp(0), config=config)
    assert result.stopped_by == "seconds" and 1 <= result.steps <= 16
    assert result.seconds >= 0.3 and time.perf_counter() - start < 5
    both = TrainConfig(steps=2, seconds=60, schedule="constant")
    assert (
        train(_mlp(1), _data(), task=ClassificationTask(), teacher=_mlp(0), config=both).stopped_by == "steps"
    )


def test_embedding_distillation_with_padded_text() -> None:
    """Text batches of different lengths are padded into one pool of samples; the loss ignores padding."""

    class Embed(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.emb, self.proj = nn.Embedding(30, 16), nn.Linear(16, 16)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.tanh(self.emb(input_ids))) * attention_mask[..., None]

    gen = torch.Generator().manual_seed(0)
    batches = []
    for length in (5, 9, 7):
        ids = torch.randint(1, 30, (6, length), generator=gen)
        mask = (torch.arange(length)[None] < torch.randint(2, length + 1, (6, 1), generator=gen)).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    teacher, student = Embed(0), Embed(1)
    config = TrainConfig(steps=60, lr=2e-2, batch_size=4, log_every=5)
    result = train(student, DataSplit(batches=batches), task=EmbeddingTask(), teacher=teacher, config=config)
    assert result.losses[-1][1] < 0.5 * result.losses[0][1]


def test_bad_inputs() -> None:
    with pytest.raises(ValidationError, match="budget"):
        TrainConfig()
    with pytest.raises(ValidationError, match="length"):
        TrainConfig(seconds=10)  # a cosine schedule cannot decay towards an unknown end
    with pytest.raises(ValidationError, match="past"):
        TrainConfig(steps=10, schedule_steps=5)
    with pytest.raises(ValidationError):
        TrainConfig(steps=10, learning_rate=1e-3)  # unknown key
    teacher, data = _mlp(0), _data()
    with pytest.raises(ModelpressError, match="no labels"):
        train(
            _mlp(1),
            data,
            task=ClassificationTask(),
            teacher=teacher,
            config=TrainConfig(steps=1, label_weight=0.5),
        )
    with pytest.raises(ModelpressError, match="checkpoint_dir"):
        train(
            _mlp(1),
            data,
            task=ClassificationTask(),
            teacher=teacher,
            config=TrainConfig(steps=1),
            resume=True,
        )
    with pytest.raises(ModelpressError, match="lacks the inputs"):
        train(
            _mlp(1),
            data,
            task=ClassificationTask(),
            teacher=teacher,
            config=TrainConfig(steps=1),
            input_names=["y"],
        )


def test_same_values_with_other_strides_train_the_same() -> None:
    """Image batches whose size-1 channel dimension carries channels-last strides train bit-identically to
    plain ones (convolutions would otherwise take another kernel path)."""
    from modelpress.train.zoo import DigitsCNN

    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    odd = torch.empty(24, 64).as_strided((24, 1, 8, 8), (64, 1, 8, 1)).copy_(x)
    assert odd.stride() != x.stride() and torch.equal(odd, x)
    labels = [torch.arange(24) % 10]
    models = []
    for pixels in (x, odd):
        torch.manual_seed(0)
        model = DigitsCNN(channels=(4, 8))
        config = TrainConfig(steps=4, lr=1e-2, batch_size=8, label_weight=1.0)
        train(model, DataSplit([{"pixel_values": pixels}], labels), task=ClassificationTask(), config=config)
        models.append(model)
    _assert_same_weights(*models)
