"""prune.global and memory: the model is traced once, on the original, before the pass copies it (group
discovery's dry runs then hold one model, not two), and the copy reuses that discovery."""

from __future__ import annotations

import pytest
import torch

from modelpress.data import load_data
from modelpress.data.tasks import ClassificationTask
from modelpress.graph import ModelGraph
from modelpress.passes import Context, registered_passes
from tests.fuse.tiny import digits_vit


def test_discovery_runs_once_on_the_original_before_the_copy(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    graph = digits_vit(0)
    data = load_data("digits", graph.input_spec, batch_size=16, n_calibration=32, n_evaluation=16)
    copy, trace = ModelGraph.copy, ModelGraph.trace
    events: list[tuple[str, bool]] = []

    def copying(self, **kwargs):  # noqa: ANN001, ANN003, ANN202
        events.append(("copy", self._groups is not None and self._blocks is not None))
        return copy(self, **kwargs)

    def tracing(self):  # noqa: ANN001, ANN202
        events.append(("trace", self is graph))
        return trace(self)

    monkeypatch.setattr(ModelGraph, "copy", copying)
    monkeypatch.setattr(ModelGraph, "trace", tracing)
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0)
    cls = registered_passes()["prune.global"]
    result = cls(cls.Config(saliency="hessian", target="params", ratio=0.7, iterations=2)).apply(graph, ctx)
    assert result.graph.num_parameters() < graph.num_parameters()
    assert events[0] == ("trace", True)  # the original, first
    assert ("copy", True) in events and events.index(("copy", True)) == 1  # then copied, discovery done
    assert [e for e in events if e[0] == "trace"] == [("trace", True)]  # and never traced again


def _storages(*graphs: ModelGraph) -> dict[int, int]:
    """The distinct parameter storages the graphs hold (address -> bytes): what is stored, copies counted once."""
    out = {}
    for g in graphs:
        for p in g.module.parameters():
            out[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return out


def _run_pass(graph: ModelGraph, tmp_path, **config):  # noqa: ANN001, ANN003, ANN202
    data = load_data("digits", graph.input_spec, batch_size=16, n_calibration=32, n_evaluation=16)
    ctx = Context(workdir=tmp_path, task=ClassificationTask(), data=data, reference=graph, seed=0)
    cls = registered_passes()["prune.global"]
    return cls(cls.Config(saliency="hessian", target="params", ratio=0.6, iterations=2, reconstruct_samples=64,
                          **config)).apply(graph, ctx)


def test_the_pass_stores_the_original_plus_what_it_cut_not_a_second_model(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Until its first removal the pass's copy holds no weight bytes of its own (the stored tensors are the
    original's), it cuts new ones, the refit never writes into the original's, and it returns owning its weights;
    the result is bit-identical to pruning a full copy."""
    graph = digits_vit(0)
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    original = _storages(graph)
    seen: list[tuple[int, int, int]] = []  # at each removal: stored storages, stored bytes, bytes the copy shares
    remove_many = ModelGraph.remove_many

    def removing(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self is not graph:
            stored = _storages(graph, self)
            seen.append((len(stored), sum(stored.values()), self.shared_bytes(graph)))
        return remove_many(self, *args, **kwargs)

    monkeypatch.setattr(ModelGraph, "remove_many", removing)
    result = _run_pass(graph, tmp_path, kinds=["head", "mlp", "block"])  # norms, embeddings, head stay shared
    assert len(seen) == 2  # two iterations
    assert seen[0][:2] == (len(original), sum(original.values()))  # no second model before the first cut
    assert seen[0][2] == sum(original.values())
    assert seen[1][1] < 1.8 * sum(original.values())  # the original and the first iteration's 0.8x, no more
    assert result.graph.shared_bytes(graph) == 0  # owned on the way out: later passes may train it in place
    assert result.metrics["reconstruct"]  # the refit ran (and wrote new storage, not the original's)
    after = graph.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # pruning a full deep copy (what the pass did before) gives the same model, bit for bit
    monkeypatch.setattr(ModelGraph, "remove_many", remove_many)
    copy = ModelGraph.copy
    monkeypatch.setattr(ModelGraph, "copy", lambda self, **kw: copy(self))
    full = _run_pass(digits_vit(0), tmp_path / "full", kinds=["head", "mlp", "block"])
    ours, theirs = result.graph.module.state_dict(), full.graph.module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_own_weights_refuses_a_copy_that_wrote_into_the_original(tmp_path) -> None:  # noqa: ANN001
    graph = digits_vit(0)
    shared = graph.copy(share_weights=True)
    assert shared.shared_bytes(graph) == sum(p.numel() * 4 for p in graph.module.parameters())
    with torch.no_grad():
        next(shared.module.parameters()).mul_(2.0)
    with pytest.raises(RuntimeError, match="written in place"):
        shared.own_weights(graph)
    fine = graph.copy(share_weights=True)
    assert fine.own_weights(graph) > 0
    assert fine.shared_bytes(graph) == 0
