"""prune.global and memory: the model is traced once, on the original, before the pass copies it (group
discovery's dry runs then hold one model, not two), and the copy reuses that discovery."""

from __future__ import annotations

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

    def copying(self):  # noqa: ANN001, ANN202
        events.append(("copy", self._groups is not None and self._blocks is not None))
        return copy(self)

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
