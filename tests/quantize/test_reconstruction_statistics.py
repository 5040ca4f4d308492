"""Reconstruction and clipping statistics come from data.probes and equal what hand-written hooks collect,
so GPTQ results are bit for bit those of the private collectors the probes replaced."""

from __future__ import annotations

import copy

import pytest
import torch

from modelpress.quantize.fakequant import QuantConfig, QuantLinear, calibrate, wrap_model
from tests.quantize.blocks import Stack


def quantized_stack() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Stack(kind="pre", depth=2)
    x = [torch.randn(4, 16, 32) for _ in range(3)]
    wrap_model(model, {"*": "w4a8"}, QuantConfig(attention=False))
    calibrate(model, x, observer="minmax")
    return model, x


def reference_hessians(model: torch.nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """H = sum_batches X^T X / n of each QuantLinear's quantized input, summed batch by batch in float64
    (what reconstruct.py's own hook did before the probes)."""
    sums, rows, handles = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):

            def hook(mod, args, name=name):  # noqa: ANN001, ANN202
                x = mod.prepare_input(args[0])
                x = mod.input_quantizer(x) if mod.input_quantizer is not None else x
                x = x.detach().reshape(-1, x.shape[-1]).double()
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                sums[name].addmm_(x.t(), x)  # summed as the probes sum (in place: the same float64 rounding)
                rows[name] = rows.get(name, 0) + x.shape[0]

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: sums[n] / rows[n] for n in sums}


def test_gptq_through_probes_equals_gptq_on_hand_collected_hessians():
    from modelpress.quantize.reconstruct import _collect, gptq_weight, reconstruct

    model, x = quantized_stack()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight_quantizer.enabled = False  # reconstruct collects on float weights
    ref_h = reference_hessians(model, x)
    q = model.blocks[0].attn.q
    with torch.no_grad():  # q's quantized inputs over the concatenated batches
        brute = q.input_quantizer(q.prepare_input(model.blocks[0].norm1(model.embed_norm(torch.cat(x)))))
    brute = brute.reshape(-1, 32).double()
    probe_h = dict(zip(names, _collect(model, names, x), strict=True))
    torch.testing.assert_close(
        probe_h["blocks.0.attn.q"], brute.t() @ brute / brute.shape[0], rtol=1e-12, atol=1e-12
    )
    for n in names:
        assert torch.equal(probe_h[n], ref_h[n]), n
    expected = {}
    for n in names:
        m = model.get_submodule(n)
        expected[n] = gptq_weight(m.weight.detach().clone(), ref_h[n], m.weight_quantizer)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight_quantizer.enabled = True
    reconstructed = copy.deepcopy(model)
    reconstruct(reconstructed, x, method="gptq")
    for n in names:
        assert torch.equal(reconstructed.get_submodule(n).weight, expected[n]), n


def test_clipping_inputs_are_the_consumers_prepared_inputs_subsampled_by_seed():
    from modelpress.quantize.clipping import collect_group_inputs
    from modelpress.quantize.reparam import build_groups

    model, x = quantized_stack()
    groups = build_groups(model, model.norm_pairs())
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for g in groups:
        name, first = g.consumers[0]

        def hook(mod, args, name=name):  # noqa: ANN001, ANN202
            seen.setdefault(name, []).append(mod.prepare_input(args[0]).detach().reshape(-1, 32).float())

        handles.append(first.register_forward_pre_hook(hook))
        g.quantizer.enabled = False  # the collection runs with the groups' quantizers passing through
    with torch.no_grad():
        for b in x:
            model(b)
    for h in handles:
        h.remove()
    for g in groups:
        g.quantizer.enabled = True
    from modelpress.data.sampling import RowSample

    expected = []
    for i, g in enumerate(groups):  # sampled as the batches arrive, seeded (seed, i) for the i-th layer
        sample = RowSample(20, (3, i))
        for rows in seen[g.consumers[0][0]]:
            sample.add(rows)
        expected.append(sample.rows())
    got = collect_group_inputs(model, groups, x, max_rows=20, seed=3)
    assert len(got) == len(groups)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    assert all(g.quantizer.enabled for g in groups)  # switched back on after the pass


def test_layer_gptq_holds_one_blocks_hessians_and_equals_the_one_pass_result(monkeypatch):
    """Layer-granularity GPTQ given the blocks collects one block's Hessians at a time (counted: those alive
    when each stage's are collected, and the most alive at once) and gives bit for bit the weights of
    collecting every layer in one pass (every Hessian on the float model; weights written after the last stage)."""
    import weakref

    from modelpress.quantize import reconstruct as rec

    model, x = quantized_stack()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    one_pass = copy.deepcopy(model)
    errors_one = rec.reconstruct(one_pass, x, method="gptq")  # no blocks: one stage of all layers
    live: set[int] = set()
    alive_at_collect: list[int] = []
    most = [0]
    collect = rec._collect

    def counting(model_, names_, batches_, stop_after=None):  # noqa: ANN001, ANN202
        alive_at_collect.append(len(live))
        hs = collect(model_, names_, batches_, stop_after=stop_after)
        for h in hs:
            live.add(id(h))
            weakref.finalize(h, live.discard, id(h))
        most[0] = max(most[0], len(live))
        return hs

    monkeypatch.setattr(rec, "_collect", counting)
    staged = copy.deepcopy(model)
    errors_staged = rec.reconstruct(staged, x, method="gptq", blocks=["blocks.0", "blocks.1"])
    per_block = max(sum(n.startswith(b + ".") for n in names) for b in ("blocks.0", "blocks.1"))
    assert len(alive_at_collect) == 3 and alive_at_collect == [0, 0, 0]  # two blocks, then the head
    assert most[0] == per_block < len(names)
    for n in names:
        assert torch.equal(staged.get_submodule(n).weight, one_pass.get_submodule(n).weight), n
    assert list(errors_staged) == list(errors_one) and errors_staged == errors_one


def test_weights_waiting_for_the_last_stage_are_held_as_int8_codes_and_come_back_bit_exact():
    from modelpress.quantize.reconstruct import _held, _release, gptq_weight

    model, x = quantized_stack()
    m = model.blocks[0].attn.q
    h = reference_hessians(model, x)["blocks.0.attn.q"]
    wq = gptq_weight(m.weight.detach().clone(), h, m.weight_quantizer)
    held = _held(wq, m.weight_quantizer, True)
    assert isinstance(held, tuple) and held[0].dtype == torch.int8  # a quarter of the float bytes while waiting
    assert torch.equal(_release(held), wq)
    off_grid = wq + 1e-3
    assert _held(off_grid, m.weight_quantizer, True) is off_grid


def test_gptq_factors_the_hessian_in_place_and_leaves_the_callers_untouched():
    """GPTQ's inverse-Hessian factor, formed in one matrix's memory (BERT-base's compress peaked on the copies),
    equals torch's three-step form; the caller's H is never written; a singular H is refused, not NaN."""
    from modelpress.quantize.quantizers import UniformQuantizer
    from modelpress.quantize.reconstruct import _inverse_cholesky_in_place, gptq_weight

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=gen, dtype=torch.float64)
    x[:, [5, 40]] = 0  # dead inputs
    h = x.t() @ x / 300
    damped = h.clone()
    damped.diagonal()[damped.diagonal() == 0] = 1.0
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    work = damped.clone()
    got = _inverse_cholesky_in_place(work)
    assert got.data_ptr() == work.data_ptr()  # no second matrix
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.tril(got, -1), torch.zeros_like(got))  # upper triangular

    q = UniformQuantizer(8, symmetric=True)
    q.scale = torch.tensor(0.02)
    w = torch.randn(16, 96, generator=gen)
    before = h.clone()
    for act_order in (True, False):
        wq = gptq_weight(w, h, q, act_order=act_order)
        assert torch.equal(h, before)
        assert torch.isfinite(wq).all() and torch.equal(wq[:, [5, 40]], torch.zeros(16, 2))
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        _inverse_cholesky_in_place(-torch.eye(8, dtype=torch.float64))
