"""Targets: the registry, thread overrides, availability and errors."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from modelpress.bench import TARGETS, Target, get_target, list_targets
from modelpress.errors import ModelpressError
from modelpress.targets import cpu_count


def test_registry_has_cpu_and_edge_profiles():
    cpu = get_target("ort-cpu")
    assert cpu.provider == "CPUExecutionProvider" and cpu.device == "cpu"
    assert cpu.threads == cpu_count()
    assert cpu.batch_sizes == (1, 8) and cpu.seq_lens == (128,)
    edge = get_target("edge")
    assert edge.threads == 1 and edge.batch_sizes == (1,)
    assert {"ort-cpu", "edge", "ort-cuda", "tensorrt"} <= set(list_targets())


def test_thread_override_makes_a_copy():
    one = get_target("ort-cpu", threads=1)
    assert one.threads == 1 and TARGETS["ort-cpu"].threads == cpu_count()
    assert get_target(one) is one
    with pytest.raises(ModelpressError):
        get_target("ort-cpu", threads=0)


def test_unknown_target_lists_known_ones():
    with pytest.raises(ModelpressError) as info:
        get_target("quantum")
    assert "quantum" in str(info.value) and "ort-cpu" in str(info.value) and "edge" in str(info.value)


def test_availability_follows_onnxruntime():
    assert get_target("ort-cpu").available()
    cuda = get_target("ort-cuda")
    assert cuda.providers[0] == "CUDAExecutionProvider" and cuda.device == "cuda"
    assert cuda.available() == ("CUDAExecutionProvider" in ort.get_available_providers())
    if not cuda.available():
        with pytest.raises(ModelpressError, match="CUDAExecutionProvider"):
            cuda.require_available()


def test_session_options_and_dict():
    target = Target(name="t", threads=1, batch_sizes=(2,), description="x")
    so = target.session_options()
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    d = target.to_dict()
    assert d["providers"] == ["CPUExecutionProvider"] and d["batch_sizes"] == [2]
    quiet = target.with_session_config(**{"session.intra_op.allow_spinning": "0"})
    assert quiet.to_dict()["session_config"] == {"session.intra_op.allow_spinning": "0"}
    assert quiet.session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert target.session_config == ()
