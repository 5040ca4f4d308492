"""prune.fuse_blocks (FuseGPT): Macro Influence ranks a block that adds nothing as free and removes it first; the
learnable fusion starts as plain removal exactly and folds into dense weights without changing outputs; the
CLI's output exports, verifies against torch and reloads with fewer layers; runs are deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import modelpress
from modelpress.cli import main
from modelpress.passes import Context
from modelpress.prune.blocks.fusion import fold, group_loss, remove_with_learnable_fusion, tunable_group
from modelpress.prune.blocks.importance import block_influence, block_scores, macro_influence, output_change
from modelpress.prune.blocks.pass_ import FuseBlocks

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 with 4 blocks (transformers' Conv1D layers), saved and loaded as a ModelGraph."""
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("fuse") / "gpt2"
    cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=200, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # GPT-2 initializes biases at zero: nonzero ones make the injected biases count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(ckpt)
    graph = modelpress.load(str(ckpt))
    _ = graph.blocks
    return ckpt, graph


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 200, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(n)]


def _inputs() -> dict[str, torch.Tensor]:
    return _batches(1)[0]


def _context(tmp_path) -> Context:
    from modelpress.data.sources import DataSplit, TaskData
    from modelpress.data.tasks import LanguageModelTask

    data = TaskData(calibration=DataSplit(_batches()), evaluation=DataSplit(_batches(1)),
                    description="random token ids")
    return Context(workdir=tmp_path, task=LanguageModelTask(), data=data, seed=0)


def test_block_adding_nothing_has_zero_macro_influence_and_goes_first(gpt2, tmp_path):
    _, graph = gpt2
    g = graph.copy()
    with torch.no_grad():  # block 1 writes nothing to the residual stream: its attention and MLP outputs are zero
        for layer in (g.module.transformer.h[1].attn.c_proj, g.module.transformer.h[1].mlp.c_proj):
            layer.weight.zero_()
            layer.bias.zero_()
    paths = [b.path for b in g.blocks]
    task = _context(tmp_path).task
    mi = macro_influence(g, _batches(), paths)  # 1 - cos of the final hidden state
    assert mi["transformer.h.1"] < 1e-12 < 1e-5 < min(v for p, v in mi.items() if p != "transformer.h.1")
    kl = output_change(g, _batches(), task, paths)
    assert kl["transformer.h.1"] < 1e-9 < 1e-5 < min(v for p, v in kl.items() if p != "transformer.h.1")
    bi = block_influence(g, _batches(), paths)
    assert bi["transformer.h.1"] < 1e-6 < min(v for p, v in bi.items() if p != "transformer.h.1")
    hs = block_scores(g, "hessian", _batches(), task, paths)  # prune.global's saliency, reused
    assert min(hs, key=hs.get) == "transformer.h.1"
    result = FuseBlocks({"target_blocks": 0.25, "fusion": "none"}).apply(g, _context(tmp_path))
    assert result.metrics["removed_blocks"] == ["transformer.h.1"]
    assert len(result.graph.blocks) == 3 and result.graph.module.config.n_layer == 3
    assert result.graph.verify(g, atol=1e-5)["ok"]  # removing a block that adds nothing changes nothing


def test_zero_coefficients_are_plain_removal_and_folding_keeps_outputs(gpt2):
    _, graph = gpt2
    plain = graph.copy()
    plain.remove_block("transformer.h.2")
    fused = graph.copy()
    near, params = remove_with_learnable_fusion(fused, "transformer.h.2", 2, 4, seed=0)
    assert near == ["transformer.h.1", "transformer.h.2"]  # h.1 and the old h.3, renumbered
    assert len(params) == 16  # the weight and bias of 4 Conv1D layers into each of the 2 neighbours
    x = _inputs()
    assert torch.equal(fused.forward(x), plain.forward(x))  # at zero coefficients: exactly plain removal
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            coef = p.a if hasattr(p, "a") else p.c
            coef.copy_(torch.randn(coef.shape, generator=g) * 0.3)
    learned = fused.forward(x)
    assert (learned - plain.forward(x)).abs().max() > 1e-3  # the injected weights do something
    assert fold(fused) == 16
    assert not any("parametrizations" in n for n, _ in fused.module.named_parameters())
    torch.testing.assert_close(fused.forward(x), learned, atol=1e-5, rtol=1e-5)
    assert set(fused.state()) == set(plain.state())  # the architecture of plain removal


def test_group_tuning_starts_at_plain_fusion_and_folds_exactly(gpt2, tmp_path):
    """The authors' group tuning (neighbours' norms, biases and a low-rank delta per matrix): zero deltas leave the
    fused model unchanged, learned ones fold into the dense weights without changing outputs, and with the same
    steps it fits the group better than the fusion coefficients alone."""
    _, graph = gpt2
    fused = graph.copy()
    near, _ = remove_with_learnable_fusion(fused, "transformer.h.2", 2, 4, seed=0)
    x = _inputs()
    before = fused.forward(x)
    group = tunable_group(fused, near, 4, seed=0)
    assert torch.equal(fused.forward(x), before)  # zero deltas: the fusion unchanged
    deltas = [t for t in group if t.ndim == 2]
    assert len(deltas) == 16  # A and B of the 4 Conv1D layers of each of the 2 neighbours
    assert {t.ndim for t in group} == {1, 2}  # norms and biases too
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in group:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    tuned = fused.forward(x)
    assert (tuned - before).abs().max() > 1e-3
    fold(fused)
    assert not any("parametrizations" in n for n, _ in fused.module.named_parameters())
    torch.testing.assert_close(fused.forward(x), tuned, atol=1e-5, rtol=1e-5)
    cfg = {"target_blocks": 0.25, "fusion": "learned", "finetune_steps": 8, "lr": 0.01, "tune_group": False}
    coefficients = FuseBlocks(cfg).apply(graph, _context(tmp_path)).metrics["steps"][0]["finetune"]
    whole = FuseBlocks({**cfg, "tune_group": True, "group_lr": 0.01}).apply(graph, _context(tmp_path))
    assert whole.metrics["steps"][0]["finetune"]["loss_end"] < coefficients["loss_end"]
    assert not any("parametrizations" in n for n, _ in whole.graph.module.named_parameters())


def test_learned_fusion_is_deterministic_and_fits_the_group(gpt2, tmp_path):
    _, graph = gpt2
    cfg = {"target_blocks": 0.25, "fusion": "learned", "finetune_steps": 8, "lr": 0.01}
    a = FuseBlocks(cfg).apply(graph, _context(tmp_path))
    b = FuseBlocks(cfg).apply(graph, _context(tmp_path))
    step = a.metrics["steps"][0]
    assert step["finetune"]["loss_end"] < step["finetune"]["loss_start"]
    sa, sb = a.graph.state(), b.graph.state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    plain = graph.copy()
    plain.remove_block(step["block"])
    assert sa.keys() == plain.state().keys()
    assert any(not torch.equal(sa[k], plain.state()[k]) for k in sa)  # the neighbours' weights moved


def test_the_authors_batch_axis_kl_loss(gpt2, tmp_path):
    """``loss: kl-batch`` (FuseGPT's group loss): the KL of the teacher's hidden states from the student's, each
    softmaxed over the batch axis, per batch element; blind to a shift shared by the batch (unlike the MSE), and
    the group tuning minimizes it."""
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    p, q = torch.softmax(t.double(), 0), torch.softmax(s.double(), 0)
    by_hand = float((p * (p.log() - q.log())).sum() / 4)
    assert float(group_loss(s, t, "kl-batch")) == pytest.approx(by_hand, rel=1e-5)
    shift = torch.randn(1, 5, 8, generator=g) * 3  # the same for every batch element: invisible over the batch axis
    assert float(group_loss(s + shift, t, "kl-batch")) == pytest.approx(by_hand, rel=1e-4)
    assert float(group_loss(s + shift, t)) > float(group_loss(s, t)) + 1.0  # the MSE sees it
    assert float(group_loss(t, t, "kl-batch")) == pytest.approx(0.0, abs=1e-7)
    _, graph = gpt2
    cfg = {"target_blocks": 0.25, "finetune_steps": 8, "lr": 0.01, "tune_group": True, "group_lr": 1e-3,
           "loss": "kl-batch"}
    fit = FuseBlocks(cfg).apply(graph, _context(tmp_path)).metrics["steps"][0]["finetune"]
    assert fit["loss"] == "kl-batch" and fit["loss_end"] < fit["loss_start"]


def test_fused_decoder_exports_verifies_and_reloads(gpt2, tmp_path):
    """Decoders: the renumbered layers and config survive save/reload and the ONNX export (verified against torch)."""
    _, graph = gpt2
    ctx = _context(tmp_path)
    fused = FuseBlocks({"target_blocks": 0.5, "finetune_steps": 2}).apply(graph, ctx).graph
    exported = ctx.export(fused, tmp_path / "model.onnx")
    assert exported.verification is not None and exported.verification.ok  # the export raises otherwise
    modelpress.models.save(fused, tmp_path / "saved")
    g = modelpress.models.load_saved(tmp_path / "saved")
    assert g.module.config.n_layer == 2 and len(g.module.transformer.h) == 2
    assert [m.attn.layer_idx for m in g.module.transformer.h] == [0, 1]
    prompt = _inputs()["input_ids"][:2, :6]
    with torch.no_grad():  # the key-value cache of the renumbered layers: cached and uncached generation agree
        cached = g.module.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = g.module.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached) and cached.shape == (2, 10)
    torch.testing.assert_close(g.forward(_inputs()), fused.forward(_inputs()), atol=1e-6, rtol=0)
    from modelpress.data import onnx_runner

    x = {k: v.numpy() for k, v in _inputs().items()}
    np.testing.assert_allclose(onnx_runner(exported.path)(x), g.forward(_inputs()).numpy(), atol=1e-4)


@pytest.mark.usefixtures("short_timing")
def test_cli_fuse_blocks_on_the_digits_vit(zoo_vit, tmp_path, capsys):
    out = tmp_path / "out"
    main(["prune", str(zoo_vit.path), "--method", "fuse-blocks", "--target-blocks", "0.25", "--finetune-steps", "5",
          "--neighbours", "1", "--data", "digits", "-o", str(out), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    metrics = report["passes"][0]
    assert metrics["blocks_before"] == 4 and metrics["blocks_after"] == 3
    assert report["quality"]["after"]["accuracy"] > 0.5
    g = modelpress.load(str(out))
    assert g.module.config.num_hidden_layers == 3 and len(g.blocks) == 3
    from modelpress.data import onnx_runner

    x = {n: v.numpy() for n, v in g.example_inputs(4, seed=3).items()}
    np.testing.assert_allclose(onnx_runner(out / "model.onnx")(x), g.forward(g.example_inputs(4, seed=3)).numpy(),
                               atol=1e-4)


def test_bad_options_are_short_errors(gpt2, tmp_path, capsys):
    ckpt, _ = gpt2
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(ckpt), "--method", "global", "--target-blocks", "0.25", "-o", str(tmp_path / "o")])
    assert exc.value.code != 0
    assert "error: --target-blocks is for --method fuse-blocks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", str(ckpt), "--method", "fuse-blocks", "--target-blocks", "0.25", "--importance", "nope",
              "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.startswith("error:") and "importance" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_parameter_target_removes_blocks_until_it_is_met(gpt2, tmp_path, capsys):
    """``target: params``: blocks go one at a time until at most ``ratio`` of the parameters remain, and no more;
    a ratio that removing every block cannot reach, or a latency target without a latency model, is a short
    error."""
    from modelpress.errors import ModelpressError

    _, graph = gpt2
    before = graph.num_parameters()
    per_block = (before - FuseBlocks({"target_blocks": 0.25, "fusion": "none"}).apply(
        graph, _context(tmp_path)).graph.num_parameters())
    ratio = 1 - 1.5 * per_block / before  # needs two blocks removed, not one
    res = FuseBlocks({"target": "params", "ratio": ratio, "fusion": "none"}).apply(graph, _context(tmp_path))
    assert res.metrics["blocks_after"] == 2 and res.metrics["ratio_reached"] <= ratio
    assert res.metrics["ratio_reached"] == pytest.approx(res.graph.num_parameters() / before)
    with pytest.raises(ModelpressError, match="not the 0.01 asked for"):
        FuseBlocks({"target": "params", "ratio": 0.01, "fusion": "none"}).apply(graph, _context(tmp_path))
    with pytest.raises(ModelpressError, match="latency model"):
        FuseBlocks({"target": "latency", "ratio": 0.5, "fusion": "none"}).apply(graph, _context(tmp_path))
    # the pipeline (modelpress prune --target-latency) builds the latency model for a pass that says it needs one
    assert FuseBlocks({"target": "latency", "ratio": 0.5}).needs_latency_model
    assert not FuseBlocks({"target": "params", "ratio": 0.5}).needs_latency_model
    ckpt, _ = gpt2
    with pytest.raises(SystemExit):  # one target on the command line
        main(["prune", str(ckpt), "--method", "fuse-blocks", "--target-blocks", "0.25", "--target-params", "0.5",
              "-o", str(tmp_path / "p")])
    assert "give one of --target-blocks, --target-params" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
