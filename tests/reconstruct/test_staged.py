"""The staged refit (block by block from cached block inputs) against the per-layer re-run from the model's
inputs: the same weights, and each block run a number of times that does not grow with depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.data import load_data
from modelpress.graph import ModelGraph
from modelpress.passes import Context, registered_passes
from modelpress.reconstruct import LayerMap, layer_map, reconstruct_layers
from modelpress.reconstruct.layers import matrix, skip_reason


def _count_starts(module: torch.nn.Module, paths: list[str]) -> tuple[dict[str, int], list]:
    """How many forwards start in each module of ``paths`` (pre-hooks: stopped runs count too)."""
    counts = dict.fromkeys(paths, 0)

    def hook(path: str):  # noqa: ANN202
        def pre(*_: object) -> None:
            counts[path] += 1
        return pre

    return counts, [module.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]


def test_staged_refit_equals_the_per_layer_rerun_with_block_runs_linear_in_depth(zoo_vit, tmp_path) -> None:  # noqa: ANN001
    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, batch_size=16, n_calibration=96, n_evaluation=None)
    ctx = Context(workdir=tmp_path, data=data, reference=graph, seed=0)
    cls = registered_passes()["prune.magnitude"]
    config = cls.Config(ratios={"mlp": 0.5, "head": 0.5, "embedding": 0.25}, reconstruct=False)
    pruned = cls(config).apply(graph, ctx).graph
    maps, _ = layer_map(graph, pruned, every=True)
    batches = list(data.calibration.batches)
    blocks = [b for b in (f"vit.layers.{i}" for i in range(8)) if b in dict(graph.module.named_modules())]
    assert len(blocks) >= 4
    refit, counts = {}, {}
    for staged in (True, False):
        p = pruned.copy()
        orig_counts, h1 = _count_starts(graph.module, blocks)
        prun_counts, h2 = _count_starts(p.module, blocks)
        try:
            results = reconstruct_layers(graph.module, p.module, maps, batches, input_names=list(graph.input_spec.names),
                                         residual=True, staged=staged)
        finally:
            for h in h1 + h2:
                h.remove()
        assert sum(r.applied for r in results.values()) >= 4 * len(blocks)
        refit[staged] = p.module.state_dict()
        counts[staged] = {b: orig_counts[b] + prun_counts[b] for b in blocks}
    for k, v in refit[False].items():
        torch.testing.assert_close(refit[True][k], v, rtol=1e-5, atol=1e-6, msg=k)
    n = len(batches)
    # staged, per model: per batch a block starts once per stage inside it (at most one per layer), once for
    # the previous block's residual writer whose stream it reads, once to capture or advance, once for the
    # layers after the chain (the classifier); plus one-batch runs (chain and order discovery, two
    # residual-consumer probes per stage here and in the block before, and the ones outside the chain).
    # Nothing grows with depth (measured 128-140 here; the re-run from the inputs starts block 0 262 times)
    for b in blocks:
        bound = 2 * ((sum(m.startswith(b + ".") for m in maps) + 4) * n + 24)
        assert counts[True][b] <= bound, (b, counts[True], bound)
        if b == blocks[0]:  # the re-run from the inputs starts block 0 for every stage after it: O(depth)
            assert counts[False][b] > bound, (counts[False], bound)
    print("block starts, staged / re-run:", counts[True], counts[False])


def test_staged_refit_replays_a_decoder_with_a_key_value_cache() -> None:
    """A GPT-2 that builds a cache object per forward (its blocks get it as an argument) and reads an
    attention mask: the replayed blocks get no cache and give the re-run's refit."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=32, use_cache=True,
                                     bos_token_id=0, eos_token_id=0)
    original = transformers.GPT2Model(config).eval()
    pruned = transformers.GPT2Model(config).eval()
    with torch.no_grad():  # the "pruned" model: the original's weights, perturbed
        for a, b in zip(pruned.parameters(), original.parameters(), strict=True):
            a.copy_(b + 0.05 * torch.randn_like(b))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 8:] = 0
        batches.append({"input_ids": torch.randint(0, 128, (4, 12), generator=gen), "attention_mask": mask})
    maps = {n: LayerMap(n, np.arange(matrix(m).shape[1]), np.arange(matrix(m).shape[0]))
            for n, m in pruned.named_modules() if n.startswith("h.") and hasattr(m, "weight") and skip_reason(m) is None}
    out, starts = {}, {}
    for staged in (True, False):
        p = transformers.GPT2Model(config).eval()
        p.load_state_dict(pruned.state_dict())
        counts, hooks = _count_starts(p, ["h.0"])
        try:
            results = reconstruct_layers(original, p, maps, batches, input_names=["input_ids", "attention_mask"],
                                         residual=True, staged=staged)
        finally:
            for h in hooks:
                h.remove()
        assert sum(r.applied for r in results.values()) == len(maps) == 12
        out[staged], starts[staged] = p.state_dict(), counts["h.0"]
    assert starts[True] < starts[False], starts  # the blocks were replayed (measured 37 against 61 at 3 blocks)
    for k, v in out[False].items():
        torch.testing.assert_close(out[True][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_refit_reads_the_process_mappings_once(zoo_vit, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The refit drops mapped weights after every block of every forward (hundreds of calls): the process's
    mappings are read once for the whole refit, not per call (reading /proc/self/smaps in a process with
    thousands of mappings cost 10-20 ms a call: a 10x slower prune on a small model)."""
    from modelpress import system

    graph = ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")
    data = load_data("digits", graph.input_spec, batch_size=16, n_calibration=48, n_evaluation=None)
    ctx = Context(workdir=tmp_path, data=data, reference=graph, seed=0)
    cls = registered_passes()["prune.magnitude"]
    pruned = cls(cls.Config(ratios={"mlp": 0.5}, reconstruct=False)).apply(graph, ctx).graph
    maps, _ = layer_map(graph, pruned, every=True)
    reads = []
    real = system._file_mappings
    monkeypatch.setattr(system, "_file_mappings", lambda *a: reads.append(a) or real(*a))
    drops = []
    real_drop = system.drop_file_pages
    monkeypatch.setattr(system, "drop_file_pages", lambda r: drops.append(1) or real_drop(r))
    import modelpress.graph.mapped as mapped

    monkeypatch.setattr(mapped, "drop_file_pages", system.drop_file_pages)
    results = reconstruct_layers(graph.module, pruned.module, maps, list(data.calibration.batches),
                                 input_names=list(graph.input_spec.names))
    assert sum(r.applied for r in results.values()) >= 2
    assert len(drops) >= 10  # a drop after every block passed and every block of a whole forward
    assert len(reads) <= 1, f"{len(reads)} reads of the process's mappings for {len(drops)} drops"
