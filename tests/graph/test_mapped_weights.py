"""Weights mapped from a checkpoint file leave the resident set once read, and read the same afterwards."""

from __future__ import annotations

import platform

import pytest
import torch

from modelpress.system import drop_file_pages, release_freed_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/maps and madvise: Linux only")


def _status(field: str) -> int:
    """A memory field of /proc/self/status (RssFile, RssAnon) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _rss_file() -> int:
    return _status("RssFile")


def test_mapped_weights_of_a_loaded_checkpoint_leave_and_read_the_same(tmp_path):
    """A Hugging Face folder loaded as the CLI loads it: its weights are mapped from model.safetensors; after a
    forward has read them, dropping them lowers the file-backed resident set by about their size, and the next
    forward gives bit-identical outputs."""
    import transformers as T

    from modelpress.models.loaders import load_hf

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024)
    T.BertModel(config).save_pretrained(tmp_path)  # about 21 MB of float32 weights
    graph = load_hf(tmp_path)
    x = graph.example_inputs(2, 16)
    weights = sum(p.numel() * p.element_size() for p in graph.module.parameters())
    out = graph.forward(x)  # first, so that the code pages it maps in are not counted below
    for p in graph.module.parameters():
        p.detach().sum()  # every page read in, as an export or a pass reads them
    before = _rss_file()
    dropped = graph.drop_mapped_weights()
    after = _rss_file()
    assert dropped > 0.9 * weights
    assert before - after > 0.8 * weights
    assert torch.equal(graph.forward(x), out)


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of the file at ``path``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_a_compress_run_leaves_the_original_weights_on_disk(tmp_path):
    """After the graph passes the original is read only by an LM's decoder export: the Pipeline drops its mapped
    weights, so the compressed model's export, evaluation and timing do not sit on a resident copy of them."""
    import transformers as T

    from modelpress.compress.pipeline import Pipeline
    from modelpress.compress.recipe import Recipe
    from modelpress.models.loaders import load_hf
    from modelpress.passes import Context

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=1024)
    T.BertModel(config).save_pretrained(tmp_path / "bert")
    graph = load_hf(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    recipe = Recipe.from_dict({"name": "halve-mlp", "passes": [{"pass": "prune.magnitude", "ratios": {"mlp": 0.5}}],
                               "export": {"optimize": "none"}})
    Pipeline(recipe).run(graph, Context(workdir=tmp_path / "work"), measure=False)
    resident = _mapped_rss(weights.resolve())
    assert resident < 0.1 * weights.stat().st_size
    out = graph.forward(graph.example_inputs(1, 8))  # and the original still runs (its pages read back in)
    assert torch.isfinite(out).all() and _mapped_rss(weights.resolve()) > 0.5 * weights.stat().st_size


def test_an_export_leaves_the_weights_it_traced_on_disk(tmp_path):
    """``export_onnx`` is done with torch after the trace and the reference outputs: its candidates' builders and
    verification sessions do not sit on a resident copy of the mapped weights."""
    import transformers as T

    from modelpress.export import export_onnx
    from modelpress.models.loaders import load_hf

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=1024)
    T.BertModel(config).save_pretrained(tmp_path / "bert")
    graph = load_hf(tmp_path / "bert")
    weights = (tmp_path / "bert" / "model.safetensors").resolve()
    result = export_onnx(graph.module, graph.input_spec, tmp_path / "bert.onnx", optimize="ort")
    assert result.verification.ok
    assert _mapped_rss(weights) < 0.1 * weights.stat().st_size


def test_weights_written_through_data_are_never_dropped(tmp_path):
    """An in-place write through ``.data`` bumps no tensor version; the written page is a private copy of the
    file's, and dropping it would bring the file's bytes back. A mapping with a written page is left alone."""
    import transformers as T

    from modelpress.models.loaders import load_hf

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=1024)
    T.BertModel(config).save_pretrained(tmp_path)
    graph = load_hf(tmp_path)
    weight = graph.module.encoder.layer[0].intermediate.dense.weight
    weight.data.add_(1.0)  # the user's edit
    assert weight._version == 0
    edited = weight.detach().clone()
    graph.drop_mapped_weights()
    assert torch.equal(weight.detach(), edited)


def test_memory_that_is_not_a_file_mapping_is_left_alone():
    """A tensor in ordinary (anonymous) memory: nothing is dropped and its values stay (dropping anonymous pages
    would zero them)."""
    t = torch.arange(1 << 20, dtype=torch.float32) + 1
    storage = t.untyped_storage()
    assert drop_file_pages([(storage.data_ptr(), storage.nbytes())]) == 0
    assert torch.equal(t, torch.arange(1 << 20, dtype=torch.float32) + 1)


def _rss_anon() -> int:
    return _status("RssAnon")


def test_spilled_weights_compute_the_same_leave_the_resident_set_and_save_without_a_copy(tmp_path):
    """A model in ordinary memory (a pruned copy) spilled to files: bit-identical outputs, its anonymous memory
    freed, its weights then droppable; tied weights stay tied; it saves and reloads the same; a write into a
    spilled weight stays in memory and the file's bytes never come back over it."""
    import transformers as T

    from modelpress import models
    from modelpress.graph import ModelGraph
    from modelpress.models.loaders import hf_input_spec
    from modelpress.models.saving import load_saved

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024)
    graph = ModelGraph(T.BertModel(config).eval(), hf_input_spec(T.BertModel(config)),
                       {"kind": "hf", "class": "BertModel", "config": config.to_dict()}, name="bert")
    x = graph.example_inputs(2, 16)
    torch.set_grad_enabled(False)  # no autograd graph holding the weights
    out = graph.forward(x)
    weights = sum(p.numel() * p.element_size() for p in graph.module.parameters())
    anon = _rss_anon()
    graph.module.register_buffer("scale0", torch.tensor(2.5), persistent=False)  # a 0-d tensor (a quantizer's scale)
    spilled = graph.spill_weights(tmp_path / "spill")
    assert graph.module.scale0.shape == () and float(graph.module.scale0) == 2.5
    release_freed_memory()  # glibc's heap keeps freed blocks until trimmed (the pipeline trims after spilling)
    assert spilled >= weights
    assert anon - _rss_anon() > 0.8 * weights  # the anonymous copies are gone
    assert torch.equal(graph.forward(x), out)
    assert graph.drop_mapped_weights() > 0.9 * weights
    assert torch.equal(graph.forward(x), out)
    models.save(graph, tmp_path / "saved")
    assert torch.equal(load_saved(tmp_path / "saved").forward(x), out)
    w = graph.module.encoder.layer[0].output.dense.weight
    w.data[0, 0] = 123.0  # through .data: no version counted
    graph.drop_mapped_weights()
    assert float(w[0, 0]) == 123.0
    torch.set_grad_enabled(True)


def test_spilling_keeps_tied_weights_tied(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    model = T.GPT2LMHeadModel(config).eval()
    from modelpress.graph.mapped import spill_weights

    ids = torch.randint(0, 500, (1, 12))
    out = model(ids).logits
    spill_weights(model, tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.untyped_storage().data_ptr() == model.transformer.wte.weight.untyped_storage().data_ptr()
    assert torch.equal(model(ids).logits, out)


def test_a_pass_over_data_holds_one_layers_mapped_weights_resident(tmp_path):
    """Saliency's forwards and backwards read every weight: under ``dropped_after_use`` (as ``data.probes.collect``
    runs them) each layer's mapped weights leave the resident set once read, so at no layer of the forward is
    the checkpoint's file resident whole; gradients and outputs are the same as without it."""
    import transformers as T

    from modelpress.graph.mapped import dropped_after_use
    from modelpress.models.loaders import load_hf

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024)
    T.BertModel(config).save_pretrained(tmp_path)
    graph = load_hf(tmp_path)
    weights = (tmp_path / "model.safetensors").resolve()
    x = graph.example_inputs(2, 16)
    module = graph.module

    def grads() -> tuple[torch.Tensor, dict]:
        module.zero_grad(set_to_none=True)
        out = module(**x).last_hidden_state
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    out, expected = grads()
    graph.drop_mapped_weights()
    seen = []
    last = module.encoder.layer[-1]
    probe = last.register_forward_hook(lambda *_: seen.append(_mapped_rss(weights)))
    try:
        with dropped_after_use(module) as done:
            got_out, got = grads()
            for p in module.parameters():
                done(p)
    finally:
        probe.remove()
    size = weights.stat().st_size
    assert seen and max(seen) < 0.5 * size, f"{max(seen) / size:.2f} of the file resident at the last layer"
    assert _mapped_rss(weights) < 0.1 * size
    assert torch.equal(got_out, out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
