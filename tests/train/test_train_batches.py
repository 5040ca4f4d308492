"""Training batches grouped by length: every sample once an epoch, batches that pad little, seeded, resumable."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.data import DataSplit, EmbeddingTask
from modelpress.train import TrainConfig, train
from modelpress.train.batches import GROUP_BATCHES, Samples


def _text(n: int = 230, seed: int = 0, max_len: int = 40) -> DataSplit:
    """Right-padded sentences of random lengths 2..max_len, in batches of 16 padded to their own longest."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=gen)
    batches = []
    for i in range(0, n, 16):
        part = lengths[i : i + 16]
        mask = (torch.arange(int(part.max()))[None] < part[:, None]).long()
        ids = torch.randint(1, 30, mask.shape, generator=gen) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return DataSplit(batches=batches)


def _padded(samples: Samples, order: torch.Tensor, size: int) -> int:
    """Positions the batches of ``order`` pad to, summed (what the loop runs)."""
    return sum(int(samples.batch(order[i : i + size])["attention_mask"].shape[1]) * len(order[i : i + size])
               for i in range(0, len(order), size))


def test_grouped_order_is_a_seeded_permutation_that_pads_less() -> None:
    samples, size = Samples(_text()), 8
    lengths = samples.lengths
    assert lengths is not None and int(lengths.sum()) == int(samples.tensors["attention_mask"].sum())
    plain = samples.epoch_order(torch.Generator().manual_seed(3), size)
    assert torch.equal(plain, torch.randperm(len(samples), generator=torch.Generator().manual_seed(3)))
    grouped = samples.epoch_order(torch.Generator().manual_seed(3), size, group_by_length=True)
    assert sorted(grouped.tolist()) == list(range(len(samples)))  # every sample once
    again = samples.epoch_order(torch.Generator().manual_seed(3), size, group_by_length=True)
    other = samples.epoch_order(torch.Generator().manual_seed(4), size, group_by_length=True)
    assert torch.equal(grouped, again) and not torch.equal(grouped, other)
    tail = len(samples) % size  # the short batch comes last: the shortest samples of the last (here the only) chunk
    assert tail and int(lengths[grouped[-tail:]].max()) <= int(lengths[grouped[:-tail]].min())
    real = int(lengths.sum())
    assert _padded(samples, grouped, size) < 1.1 * real < 0.7 * _padded(samples, plain, size)
    # within one chunk of GROUP_BATCHES batches the lengths of consecutive batches vary: batches are shuffled
    batch_max = [int(lengths[grouped[i : i + size]].max()) for i in range(0, len(grouped) - size, size)]
    assert batch_max != sorted(batch_max, reverse=True) and GROUP_BATCHES * size >= len(samples)


def test_non_text_data_ignores_grouping() -> None:
    data = DataSplit(batches=[{"x": torch.randn(10, 4)}, {"x": torch.randn(7, 4)}])
    samples = Samples(data)
    assert samples.lengths is None
    order = samples.epoch_order(torch.Generator().manual_seed(0), 4, group_by_length=True)
    assert torch.equal(order, torch.randperm(17, generator=torch.Generator().manual_seed(0)))


class _Embed(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.proj = nn.Embedding(30, 16), nn.Linear(16, 16)
        self.seen: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.seen.append(input_ids.numel())
        return self.proj(torch.tanh(self.emb(input_ids))) * attention_mask[..., None]


def test_training_grouped_by_length_runs_short_batches_and_resumes(tmp_path) -> None:  # noqa: ANN001
    data, teacher = _text(), _Embed(0)

    def run(grouped: bool, steps: int, folder: str, resume: bool = False) -> tuple[_Embed, object]:
        student = _Embed(1)
        config = TrainConfig(steps=steps, schedule_steps=40, lr=2e-2, batch_size=8, group_by_length=grouped,
                             checkpoint_dir=tmp_path / folder, checkpoint_every=5, log_every=5)
        return student, train(student, data, task=EmbeddingTask(), teacher=teacher, config=config, resume=resume)

    plain, _ = run(False, 40, "plain")
    grouped, result = run(True, 40, "grouped")
    assert result.losses[-1][1] < 0.5 * result.losses[0][1]
    assert sum(grouped.seen) < 0.7 * sum(plain.seen)  # the student ran fewer (padded) positions
    run(True, 17, "parts")  # stops mid-epoch (29 batches an epoch)
    resumed, second = run(True, 40, "parts", resume=True)
    assert second.resumed and second.losses == result.losses
    for (k, a), (_, b) in zip(resumed.state_dict().items(), grouped.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
