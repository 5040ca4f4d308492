"""Probes: every statistic equals what a hand-written hook or autograd loop computes, and hooks never leak."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.data.probes import UnitSums, collect
from modelpress.errors import ModelpressError
from modelpress.progress import Reporter


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


def test_subsampled_rows_are_drawn_as_they_arrive(monkeypatch):
    """With max_rows, no more than max_rows rows per layer and side are held after any batch."""
    from modelpress.data import sampling

    held: list[int] = []
    add = sampling.RowSample.add

    def counting_add(self, x):  # noqa: ANN001, ANN202
        add(self, x)
        held.append(self.held)

    monkeypatch.setattr(sampling.RowSample, "add", counting_add)
    model = TextLike()
    stats = collect(model, numpy_batches(n=12), ["fc1", "fc2"], {"inputs", "outputs"}, max_rows=7, seed=1)
    assert len(held) == 12 * 4 and max(held) == 7  # 20 rows arrive per batch
    assert stats["fc2"].outputs.shape == (7, 6)


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


def _text_units(model: nn.Module) -> dict:
    """An MLP-unit read-out (fc1 rows and bias, fc2 columns: 10 units, two positions left out), a residual
    read-out over every matrix touching the 6 channels, and a whole-parameters set (a block)."""
    mlp = torch.tensor([0, 1, 2, 8, 3, 4, 5, 6, 7, 1])  # unit 1 has two positions, position 3 none (8)
    res = torch.arange(6)
    return {
        "mlp": UnitSums(8, (("fc1.weight", 0, mlp), ("fc1.bias", 0, mlp), ("fc2.weight", 1, mlp))),
        "res": UnitSums(6, (("embed.weight", 1, res), ("fc1.weight", -1, res), ("fc2.weight", 0, res),
                            ("head.weight", 1, res))),
        "block": UnitSums(1, (("fc1.weight", None, None), ("fc1.bias", None, None), ("fc2.weight", None, None))),
    }


def _stored_unit_values(stats, spec) -> torch.Tensor:  # noqa: ANN001
    """[batches, units] ``sum_{s in u} w_s g_s`` from the stored per-batch gradients (the reference path)."""
    total = torch.zeros(stats.batches, spec.size + 1, dtype=torch.float64)
    for name, axis, owner in spec.parts:
        wg = stats.grads[name].double() * stats.weights[name].double().unsqueeze(0)
        if axis is None:
            total[:, 0] += wg.reshape(stats.batches, -1).sum(1)
            continue
        ax = axis % (wg.dim() - 1) + 1
        per_pos = wg.movedim(ax, -1).reshape(stats.batches, -1, wg.shape[ax]).sum(1)
        total.index_add_(1, owner, per_pos)
    return total[:, : spec.size]


def _stored_unit_diag(stats, spec) -> torch.Tensor:  # noqa: ANN001
    """Per unit ``sum_b sum_{s in u} (w_s g_s)^2`` from the stored gradients."""
    total = torch.zeros(spec.size + 1, dtype=torch.float64)
    for name, axis, owner in spec.parts:
        wg2 = (stats.grads[name].double() * stats.weights[name].double().unsqueeze(0)).pow(2).sum(0)
        if axis is None:
            total[0] += wg2.sum()
            continue
        ax = axis % wg2.dim()
        total.index_add_(0, owner, wg2.movedim(ax, -1).reshape(-1, wg2.shape[ax]).sum(0))
    return total[: spec.size]


@pytest.mark.parametrize("chunk", [None, 7])
def test_unit_moments_reduced_per_batch_equal_the_stored_gradients(chunk, monkeypatch):  # noqa: ANN001
    """The batch-reduced NViT / Taylor / diagonal-Fisher sums equal what the stored per-batch gradients give,
    to float64 round-off, for read-outs spanning several parameters, axes and whole parameters (also when
    each parameter's products are formed a few rows at a time: ``chunk``)."""
    if chunk is not None:
        from modelpress.data import probes

        monkeypatch.setattr(probes, "_CHUNK", chunk)
    model, batches = TextLike(), numpy_batches(n=7)
    units = _text_units(model)
    params = sorted({p for u in units.values() for p, _, _ in u.parts})
    stored = collect(model, batches, params=params, stats={"grads"}, loss_fn=loss_fn)
    reduced = collect(model, batches, stats={"unit_wg", "unit_fisher"}, units=units, loss_fn=loss_fn)
    assert reduced.batches == stored.batches == 7 and not reduced.grads and not reduced.weights
    for key, spec in units.items():
        v = _stored_unit_values(stored, spec)
        m = reduced.units[key]
        assert m.batches == 7
        torch.testing.assert_close(m.wg, v.sum(0), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(m.hessian(), v.pow(2).mean(0), rtol=1e-12, atol=1e-18)
        torch.testing.assert_close(m.taylor(), v.abs().mean(0), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(m.fisher(), _stored_unit_diag(stored, spec) / 7, rtol=1e-12, atol=1e-18)
        assert torch.all(m.hessian() > 0)
    # the stored path's own group read-out agrees (unit 2 is fc1 row 2, its bias and fc2 column 2)
    group = [("fc1.weight", slice(2, 3)), ("fc1.bias", slice(2, 3)), ("fc2.weight", (slice(None), slice(2, 3)))]
    assert float(reduced.units["mlp"].hessian()[2]) == pytest.approx(stored.saliency(group), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_unit_moments_hold_the_same_bytes_for_one_batch_or_many():
    """Memory: what the probe holds after 12 batches is what it holds after one (the reduced path); the
    stored-gradients path grows with every batch (the check can fail)."""
    model = TextLike()
    units = _text_units(model)
    one = collect(model, numpy_batches(n=1), stats={"unit_wg", "unit_fisher"}, units=units, loss_fn=loss_fn)
    many = collect(model, numpy_batches(n=12), stats={"unit_wg", "unit_fisher"}, units=units, loss_fn=loss_fn)
    assert many.batches == 12 and many.nbytes() == one.nbytes() == 4 * (8 + 6 + 1) * 8
    params = sorted({p for u in units.values() for p, _, _ in u.parts})
    g1 = collect(model, numpy_batches(n=1), params=params, stats={"grads"}, loss_fn=loss_fn)
    g12 = collect(model, numpy_batches(n=12), params=params, stats={"grads"}, loss_fn=loss_fn)
    assert g12.nbytes() > 6 * g1.nbytes()


class _LiveTensorBytes(Reporter):
    """A quiet reporter that, at every batch boundary of the probe's loop, records the bytes of every live
    tensor in the process (parameters included): what a pass holds while it runs."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.seen: list[int] = []

    def track(self, items, description, total=None):  # noqa: ANN001, ANN201
        for item in items:
            yield item
            gc.collect()
            self.seen.append(sum(
                o.numel() * o.element_size() for o in gc.get_objects()
                if issubclass(type(o), torch.Tensor) and o.layout == torch.strided and o.device.type == "cpu"
            ))


def test_a_pass_holds_one_gradient_at_a_time_whatever_the_batches():
    """Live tensor bytes during the pass stay flat from the first batch to the 16th (no per-batch copy), and
    with the stored-gradients path they grow by a model's gradients per batch (the count can fail)."""
    model = TextLike(vocab=2000, dim=32, hidden=64)  # embeddings dominate: 64k parameters
    units = {"res": UnitSums(32, (("embed.weight", 1, torch.arange(32)),))}
    rep = _LiveTensorBytes()
    collect(model, numpy_batches(n=16), stats={"unit_wg"}, units=units, loss_fn=loss_fn, reporter=rep)
    assert len(rep.seen) == 16
    assert max(rep.seen) - rep.seen[0] < 16 * 1024, rep.seen  # a few small vectors, not 256 kB per batch
    stored = _LiveTensorBytes()
    collect(model, numpy_batches(n=16), stats={"grads"}, params=["embed.weight"], loss_fn=loss_fn, reporter=stored)
    assert stored.seen[-1] - stored.seen[0] >= 15 * 2000 * 32 * 4


def _saved_bytes_per_forward(model: nn.Module, run) -> list[int]:  # noqa: ANN001
    """Bytes autograd saves for the backward in each forward of ``model`` during ``run()``."""
    per_forward: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if per_forward:
            per_forward[-1] += t.numel() * t.element_size()
        return t

    start = model.register_forward_pre_hook(lambda *_: per_forward.append(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    start.remove()
    return per_forward


def test_micro_batches_give_the_batch_gradient_and_hold_a_micro_batch_of_activations():
    """unit_wg with micro_batch: the batch's loss (targets drawn once per batch) pulled back a few samples at
    a time gives the whole-batch sums (to float32 round-off), and each backward saves a micro-batch's
    activations, not the batch's."""
    model = TextLike(vocab=50, dim=16, hidden=64)
    batches = numpy_batches(n=3, batch=16, seq=12)
    units = _text_units(TextLike()) | {"wide": UnitSums(64, (("fc1.weight", 0, torch.arange(64)),))}
    units = {k: v for k, v in units.items() if k in ("block", "wide")}
    gen = torch.Generator()

    def noisy_loss(out, batch):  # noqa: ANN001, ANN202 - draws from a generator, as the Fisher losses do
        noise = torch.randn(out.shape, generator=gen)
        return nn.functional.cross_entropy(out + 0.1 * noise, batch["labels"])

    def run(micro):  # noqa: ANN001, ANN202
        gen.manual_seed(0)
        return collect(model, batches, stats={"unit_wg"}, units=units, loss_fn=noisy_loss, micro_batch=micro)

    whole, split = run(None), run(4)
    for key in units:
        torch.testing.assert_close(split.units[key].wg, whole.units[key].wg, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(split.units[key].hessian(), whole.units[key].hessian(), rtol=1e-5, atol=1e-12)
        assert torch.any(whole.units[key].hessian() > 0)
    full = max(_saved_bytes_per_forward(model, lambda: run(None)))
    micro = _saved_bytes_per_forward(model, lambda: run(4))
    assert 0 < max(micro) <= full / 3  # 4 of 16 samples' activations per backward
    with pytest.raises(ModelpressError, match="micro_batch"):
        collect(model, batches, stats={"unit_wg", "unit_fisher"}, units=units, loss_fn=loss_fn, micro_batch=4)
