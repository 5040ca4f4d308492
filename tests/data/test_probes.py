"""Probes: every statistic equals what a hand-written hook or autograd loop computes, and hooks never leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.data.probes import collect
from modelpress.errors import ModelpressError


class TextLike(nn.Module):
    """Takes keyword inputs like a Hugging Face encoder: embeddings -> fc1 -> gelu -> fc2 -> head."""

    def __init__(self, vocab: int = 20, dim: int = 6, hidden: int = 10, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) * attention_mask[..., None]
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(dim=1))


def numpy_batches(n: int = 3, batch: int = 4, seq: int = 5, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "input_ids": rng.integers(0, 20, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "labels": rng.integers(0, 3, batch),
        }
        for _ in range(n)
    ]


def tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).long() for k, v in batch.items() if k != "labels"}


def manual_io(model: nn.Module, name: str, batches: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and outputs of ``name`` as a plain forward hook sees them."""
    seen_in, seen_out = [], []

    def hook(_m, args, out):  # noqa: ANN001, ANN202
        seen_in.append(args[0].detach())
        seen_out.append(out.detach())

    handle = model.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for b in batches:
            model(**tensors(b))
    handle.remove()
    return seen_in, seen_out


def loss_fn(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(out, batch["labels"])


def test_xtx_equals_brute_force_over_the_concatenated_inputs():
    model, batches = TextLike(), numpy_batches()
    stats = collect(model, batches, ["fc1", "fc2"], {"xtx"})
    for name in ("fc1", "fc2"):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in manual_io(model, name, batches)[0]]).double()
        assert stats[name].rows == x.shape[0] == 3 * 4 * 5
        torch.testing.assert_close(stats[name].xtx, x.t() @ x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[name].hessian(), x.t() @ x / x.shape[0], rtol=1e-12, atol=1e-12)


def test_inputs_and_outputs_equal_what_a_forward_hook_sees():
    model, batches = TextLike(), numpy_batches()
    stats = collect(model, batches, ["fc1"], {"inputs", "outputs"})
    seen_in, seen_out = manual_io(model, "fc1", batches)
    assert torch.equal(stats["fc1"].inputs, torch.cat([t.reshape(-1, 6) for t in seen_in]))
    assert torch.equal(stats["fc1"].outputs, torch.cat([t.reshape(-1, 10) for t in seen_out]))
    assert stats["fc1"].inputs.dtype == torch.float32


def test_subsampled_rows_are_seeded_and_inputs_pair_with_outputs():
    model, batches = TextLike(), numpy_batches()
    a = collect(model, batches, ["fc1"], {"inputs", "outputs"}, max_rows=7, seed=1)
    b = collect(model, batches, ["fc1"], {"inputs", "outputs"}, max_rows=7, seed=1)
    c = collect(model, batches, ["fc1"], {"inputs", "outputs"}, max_rows=7, seed=2)
    assert a["fc1"].inputs.shape == (7, 6)
    assert torch.equal(a["fc1"].inputs, b["fc1"].inputs)
    assert not torch.equal(a["fc1"].inputs, c["fc1"].inputs)
    with torch.no_grad():  # row i of the outputs is the layer applied to row i of the inputs
        torch.testing.assert_close(model.fc1(a["fc1"].inputs), a["fc1"].outputs)


def test_gradients_equal_autograd_per_batch_and_leave_the_model_as_it_was():
    model, batches = TextLike(), numpy_batches()
    model.fc2.weight.requires_grad_(False)
    model.train()
    stats = collect(model, batches, ["fc1", "fc2"], {"grads"}, loss_fn=loss_fn)
    assert set(stats.grads) == {"fc1.weight", "fc2.weight"}
    assert stats.grads["fc1.weight"].shape == (3, 10, 6)
    assert model.training and not model.fc2.weight.requires_grad  # restored
    model.eval()
    model.fc2.weight.requires_grad_(True)
    for i, b in enumerate(batches):
        feed = {**tensors(b), "labels": torch.as_tensor(b["labels"])}
        loss = loss_fn(model(**tensors(b)), feed)
        g1, g2 = torch.autograd.grad(loss, [model.fc1.weight, model.fc2.weight])
        torch.testing.assert_close(stats.grads["fc1.weight"][i], g1)
        torch.testing.assert_close(stats.grads["fc2.weight"][i], g2)
    assert all(p.grad is None for p in model.parameters())


def test_group_saliency_equals_a_loop_over_batches():
    """NViT's E_batches[(sum_{s in S} w_s g_s)^2] for a group spanning fc1 rows and fc2 columns."""
    model, batches = TextLike(), numpy_batches(n=4)
    stats = collect(
        model, batches, params=["fc1.weight", "fc1.bias", "fc2.weight"], stats={"grads"}, loss_fn=loss_fn
    )
    group = [
        ("fc1.weight", slice(2, 5)),
        ("fc1.bias", slice(2, 5)),
        ("fc2.weight", (slice(None), slice(2, 5))),
    ]
    expected = []
    for b in batches:
        feed = {**tensors(b), "labels": torch.as_tensor(b["labels"])}
        loss = loss_fn(model(**tensors(b)), feed)
        g1, gb, g2 = torch.autograd.grad(loss, [model.fc1.weight, model.fc1.bias, model.fc2.weight])
        with torch.no_grad():
            s = (
                (model.fc1.weight * g1)[2:5].sum()
                + (model.fc1.bias * gb)[2:5].sum()
                + (model.fc2.weight * g2)[:, 2:5].sum()
            )
        expected.append(float(s))
    scores = stats.group_scores(group)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert stats.saliency(group) == pytest.approx(float(np.sum(np.square(expected))) / len(batches), rel=1e-5)
    assert stats.saliency([("fc1.weight", None)]) > 0


def test_per_class_means_equal_a_manual_computation():
    model, batches = TextLike(), numpy_batches(n=3, batch=6)
    stats = collect(model, batches, ["fc2"], {"per_class"})
    _, outs = manual_io(model, "fc2", batches)
    per_sample = torch.cat([o.mean(dim=1) for o in outs]).double()  # each sample averaged over tokens
    labels = torch.cat([torch.as_tensor(b["labels"]) for b in batches])
    means = stats["fc2"].class_means()
    assert sorted(means) == sorted(labels.unique().tolist())
    for c, m in means.items():
        torch.testing.assert_close(m, per_sample[labels == c].mean(dim=0))
        assert stats["fc2"].class_counts[c] == int((labels == c).sum())


def test_conv_statistics_use_the_channel_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = [torch.randn(2, 3, 5, 5) for _ in range(2)]
    stats = collect(model, x, ["2"], {"inputs", "xtx"})
    with torch.no_grad():
        rows = torch.cat([model[1](model[0](b)).permute(0, 2, 3, 1).reshape(-1, 4) for b in x])
    torch.testing.assert_close(stats["2"].inputs, rows)
    torch.testing.assert_close(stats["2"].xtx, rows.double().t() @ rows.double())


def test_stop_after_skips_the_rest_of_the_forward():
    model, batches = TextLike(), numpy_batches()
    calls = []
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    stats = collect(model, batches, ["fc1", "head"], {"xtx"}, stop_after="fc2")
    handle.remove()
    assert stats["fc1"].rows == 60 and stats["head"].xtx is None and not calls


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        if self.calls == 2:
            raise RuntimeError("boom")
        return y


def test_hooks_are_removed_and_mode_restored_after_an_exception():
    model = Exploding().train()
    with pytest.raises(RuntimeError, match="boom"):
        collect(model, [torch.randn(2, 4) for _ in range(3)], ["fc"], {"inputs", "xtx", "outputs"})
    assert not model.fc._forward_pre_hooks and not model.fc._forward_hooks and not model._forward_hooks
    assert model.training


def test_bad_requests_are_user_errors():
    model, batches = TextLike(), numpy_batches()
    with pytest.raises(ModelpressError, match="no module"):
        collect(model, batches, ["fc9"], {"xtx"})
    with pytest.raises(ModelpressError, match="unknown statistics"):
        collect(model, batches, ["fc1"], {"hessian"})
    with pytest.raises(ModelpressError, match="need a loss"):
        collect(model, batches, ["fc1"], {"grads"})
    with pytest.raises(ModelpressError, match="labels"):
        collect(
            model, [{k: v for k, v in b.items() if k != "labels"} for b in batches], ["fc1"], {"per_class"}
        )
