"""Class-wise pruning (ED-ViT) on the digits ViT: coverage, ONNX files, combined ONNX == torch, placement,
bad input, determinism. Budgets are tiny (magnitude saliency, one pruning iteration, a few recovery steps):
the tests check the mechanics; the accuracy at real budgets is measured separately."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelpress.data import load_data, onnx_runner, torch_runner
from modelpress.data.tasks import ClassificationTask, EmbeddingTask
from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.passes import Context
from modelpress.prune.classwise import ClasswisePrune, balanced_subsets, classwise_split, onnx_predict
from modelpress.prune.placement import Device, assign

FAST = {"saliency": "magnitude", "prune": {"iterations": 1}, "recover_steps": 4, "fusion_steps": 40,
        "batch_size": 32}
GIVEN = [Device("edge-a", 2**20, latency_ms=[3.0, 2.0, 1.0]), Device("edge-b", 2**20, latency_ms=[3.0, 2.0, 1.0])]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: this ViT is tiny, and on a shared 2-core machine two threads ran its forward 12x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit(zoo_vit):
    return ModelGraph(zoo_vit.module, zoo_vit.input_spec, name="digits-vit")


@pytest.fixture(scope="module")
def digits(vit):
    return load_data("digits", vit.input_spec, n_calibration=64, n_evaluation=96)


@pytest.fixture(scope="module")
def split(vit, digits):
    devices = [Device("edge-a", 2**20, latency_ms=[2.0, 1.5, 1.0]), Device("edge-b", 2**20, latency_ms=[2.0, 1.5, 1.0])]
    return classwise_split(vit, digits, ClassificationTask(), subsets=[[0, 3, 5], [1, 2, 4, 9], [6, 7, 8]],
                           ratio=0.5, devices=devices, seed=0, **FAST)


@pytest.fixture(scope="module")
def saved(split, tmp_path_factory):
    return split.save(tmp_path_factory.mktemp("classwise") / "split")


def test_subsets_cover_every_class_once(split, vit):
    assert sorted(c for s in split.subsets for c in s) == list(range(10))
    assert balanced_subsets(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for sub in split.sub_models:  # each sub-model answers over its own classes only, and is smaller
        out = sub.graph.forward(sub.graph.example_inputs(2))
        assert out.shape == (2, len(sub.classes))
        assert sub.info["params"] < 0.53 * vit.num_parameters()
    report = split.report
    assert report["full"]["accuracy"] > 0.9
    assert {"concat", "fusion"} <= set(report["combined"])


# a split that is pruned and recovered for real (Hessian saliency, two iterations, 40 recovery steps): about
# 10 s on one thread; its combined accuracy is 0.96-0.97 against the full model's 0.979 on these 96 digits
MARGIN = 0.05


@pytest.fixture(scope="module")
def recovered_split(vit, digits):
    devices = [Device("edge", None, latency_ms=[1.0, 1.0, 1.0])]
    return classwise_split(vit, digits, ClassificationTask(), subsets=[[0, 3, 5], [1, 2, 4, 9], [6, 7, 8]],
                           ratio=0.5, devices=devices, seed=0, saliency="hessian", prune={"iterations": 2},
                           recover_steps=40, fusion_steps=100, batch_size=32)


def test_combined_accuracy_of_a_pruned_split_stays_near_the_full_model(recovered_split, vit, digits):
    """Each sub-model keeps half the full model's parameters; both combination rules, fitted on the
    calibration digits, stay within MARGIN of the full model's accuracy on the held-out ones, recounted
    here from the combined predictions (not read from the report)."""
    full = vit.num_parameters()
    for sub in recovered_split.sub_models:
        assert sub.graph.num_parameters() <= 0.52 * full
    labels = np.concatenate([b.numpy() for b in digits.evaluation.labels])
    with torch.no_grad():
        full_acc = float((np.concatenate([vit.forward(b).argmax(1).numpy() for b in digits.evaluation.batches])
                          == labels).mean())
    assert full_acc > 0.95
    for rule in ("concat", "fusion"):
        predicted = np.concatenate([recovered_split.predict(b, rule).argmax(1).numpy()
                                    for b in digits.evaluation.batches])
        accuracy = float((predicted == labels).mean())
        assert accuracy == recovered_split.report["combined"][rule]["accuracy"]
        assert accuracy >= full_acc - MARGIN, (rule, accuracy, full_acc)


def test_each_sub_model_exports_and_runs_in_onnxruntime(split, saved, digits):
    batch = digits.evaluation.numpy_batches()[0]
    for sub in split.sub_models:
        path = saved / sub.name / "model.onnx"
        ours = onnx_runner(path)(batch)
        ref = torch_runner(sub.graph.module, sub.graph.input_spec.names)(batch)
        assert ours.shape == (len(batch["pixel_values"]), len(sub.classes))
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    files = {p.name for p in saved.iterdir()}
    assert {"fusion.onnx", "concat.onnx", "fusion.safetensors", "combine.json", "assignment.json",
            "assignment.txt", "report.json"} <= files
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_combined_onnx_prediction_equals_torch(split, saved, digits):
    for batch in digits.evaluation.batches[:3]:
        numpy_batch = {k: v.numpy() for k, v in batch.items()}
        for rule in ("concat", "fusion"):
            ours = onnx_predict(saved, numpy_batch, rule)
            ref = split.predict(batch, rule).numpy()
            assert ours.shape == (len(ref), 10)
            np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))
            np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-4)
    report = json.loads((saved / "report.json").read_text())
    assert report["onnx_check"]["fusion"]["argmax_equal"]


def test_assignment_respects_memory_and_balances_load():
    # LPT on two equal devices: 5 | 4, then 3 -> the 4, then 2 -> the 5: loads 7 and 7 (the optimum)
    devices = [Device("a", 100, latency_ms=[5, 4, 3, 2]), Device("b", 100, latency_ms=[5, 4, 3, 2])]
    plan = assign([[5, 5], [4, 4], [3, 3], [2, 2]], [10, 10, 10, 10], devices)
    assert sorted(plan.loads_ms.values()) == [7.0, 7.0] and plan.makespan_ms == 7.0
    # memory: a holds one model only, so everything else goes to b although a is faster
    devices = [Device("a", 15, latency_ms=[1, 1, 1]), Device("b", 100, latency_ms=[2, 2, 2])]
    plan = assign([[1, 2], [1, 2], [1, 2]], [10, 10, 10], devices)
    assert plan.device.count("a") == 1 and plan.used_bytes["a"] <= 15
    # unequal devices: the fast one takes more
    devices = [Device("fast", None, latency_ms=[1] * 4), Device("slow", None, latency_ms=[3] * 4)]
    plan = assign([[1, 3]] * 4, [1] * 4, devices)
    assert plan.device.count("fast") == 3 and plan.makespan_ms == 3.0
    with pytest.raises(ModelpressError, match="fits on no device"):
        assign([[1, 1], [1, 1]], [60, 60], [Device("a", 100), Device("b", 50)])
    assert "slowest device" in plan.to_text()


def test_split_assignment_table(split, saved):
    table = json.loads((saved / "assignment.json").read_text())
    assert [r["sub_model"] for r in table["rows"]] == ["sub0", "sub1", "sub2"]
    assert table["makespan_ms"] == 2.5  # 2.0 | 1.5 + 1.0
    assert all(table["used_bytes"][d] <= 2**20 for d in table["used_bytes"])


def test_bad_input_is_a_short_error(vit, digits, zoo_vit, tmp_path):
    task = ClassificationTask()
    with pytest.raises(ModelpressError, match="K = 11 is more than the model's 10 classes"):
        classwise_split(vit, digits, task, k=11, **FAST)
    with pytest.raises(ModelpressError, match="exactly once"):
        classwise_split(vit, digits, task, subsets=[[0, 1, 2], [2, 3, 4, 5, 6, 7, 8, 9]], **FAST)
    with pytest.raises(ModelpressError, match="set label_weight 0"):
        classwise_split(vit, digits, task, k=2, recover_data="all", label_weight=0.5)
    backbone = ModelGraph(zoo_vit.module.vit, zoo_vit.input_spec, name="vit-backbone")
    with pytest.raises(ModelpressError, match="has no classifier"):
        classwise_split(backbone, digits, task, k=2, **FAST)
    with pytest.raises(ModelpressError, match="needs a classifier"):
        classwise_split(vit, digits, EmbeddingTask(), k=2, **FAST)
    # the pass form writes nothing when it fails
    ctx = Context(workdir=tmp_path / "work", task=task, data=digits, reference=vit)
    with pytest.raises(ModelpressError, match="K = 12"):
        ClasswisePrune({"k": 12, **FAST}).apply(vit, ctx)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.onnx"))


def test_pass_returns_the_input_and_writes_the_split(vit, digits, tmp_path):
    ctx = Context(workdir=tmp_path / "work", task=ClassificationTask(), data=digits, reference=vit)
    devices = [{"name": "a", "memory_mb": 4, "latency_ms": [1.0, 1.0]}]
    result = ClasswisePrune({"k": 2, "ratio": 1.0, "fusion_steps": 20, "devices": devices}).apply(vit, ctx)
    assert result.graph is vit
    folder = ctx.extras["artifacts"]["classwise"]
    assert (folder / "sub0" / "model.onnx").is_file() and (folder / "sub1" / "model.onnx").is_file()
    summary = result.metrics["classwise"]
    assert summary["subsets"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # unpruned sub-models: the uncalibrated concatenation is exactly the full model's logits
    report = json.loads((folder / "report.json").read_text())
    assert report["combined"]["concat"]["uncalibrated"] == report["full"]["accuracy"]


def test_deterministic_for_a_seed(vit, digits, split):
    devices = [Device("edge-a", 2**20, latency_ms=[2.0, 1.5, 1.0]), Device("edge-b", 2**20, latency_ms=[2.0, 1.5, 1.0])]
    again = classwise_split(vit, digits, ClassificationTask(), subsets=[[0, 3, 5], [1, 2, 4, 9], [6, 7, 8]],
                            ratio=0.5, devices=devices, seed=0, **FAST)
    for a, b in zip(split.sub_models, again.sub_models, strict=True):
        sa, sb = a.graph.module.state_dict(), b.graph.module.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    fa, fb = split.fusion.state_dict(), again.fusion.state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert split.report["combined"] == again.report["combined"]


@pytest.mark.slow
def test_cli_writes_the_split_into_the_output_folder(tmp_path, capsys):
    """The recipe form on the digits CNN: classwise/ lands in the output folder; a bad K leaves no folder."""
    from modelpress.cli import main

    recipe = tmp_path / "cw.yaml"
    body = ("passes:\n  - pass: prune.classwise\n    k: {k}\n    ratio: 0.5\n    saliency: magnitude\n"
            "    recover_steps: 4\n    fusion_steps: 20\n"
            "    devices: [{{name: a, memory_mb: 1, latency_ms: [1.0, 2.0]}}, {{name: b, latency_ms: [1.0, 2.0]}}]\n"
            "export:\n  optimize: none\n")
    recipe.write_text(body.format(k=2))
    out = tmp_path / "out"
    main(["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", str(recipe), "--data", "digits",
          "-o", str(out), "-q", "--json"])
    assert (out / "classwise" / "sub1" / "model.onnx").is_file() and (out / "model.onnx").is_file()
    table = json.loads((out / "classwise" / "assignment.json").read_text())
    assert {r["device"] for r in table["rows"]} == {"a", "b"}
    assert not (out / "work").exists()
    recipe.write_text(body.format(k=11))
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        main(["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", str(recipe), "--data", "digits",
              "-o", str(bad), "-q"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "K = 11 is more than the model's 10 classes" in err and "Traceback" not in err
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


@pytest.mark.slow
def test_cli_table_and_report_show_what_the_split_produced(tmp_path, capsys, monkeypatch):
    """`compress` with a class-wise recipe on the digits CNN, the devices measured on the run's target: the
    table and report.md compare each sub-model with the full model (not the unchanged model.onnx with
    itself), report.json carries the split, its latencies measured in one run beside the full model's."""
    from modelpress.cli import main

    monkeypatch.setenv("COLUMNS", "220")  # one table row per line
    recipe = tmp_path / "cw.yaml"
    recipe.write_text("passes:\n  - pass: prune.classwise\n    k: 2\n    ratio: 0.5\n    saliency: magnitude\n"
                      "    recover_steps: 4\n    fusion_steps: 20\nexport:\n  optimize: none\n")
    out = tmp_path / "out"
    main(["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", str(recipe), "--data", "digits",
          "--threads", "1", "-o", str(out), "-q"])
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    split = report["classwise"]
    full = split["full"]
    assert [s["classes"] for s in split["sub_models"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for s in split["sub_models"]:
        assert s["params"] < 0.53 * full["params"] and s["device"] in full["latency_ms"]
        assert s["full_latency_ms"] == full["latency_ms"][s["device"]] > 0 and s["latency_ms"] > 0
        assert s["speedup"] == pytest.approx(s["full_latency_ms"] / s["latency_ms"])
    assert {"fusion", "concat", "full_model"} <= set(split["combined"])
    markdown = (out / "report.md").read_text()
    for text in (table, markdown):
        assert "same size" not in text
        assert "sub0 (classes 0-4) parameters" in text and "sub1 (classes 5-9) latency on" in text
        assert "combined accuracy (fusion)" in text and "combined accuracy (concat)" in text
    assert "## Class-wise split" in markdown and "slowest device" in markdown
    rows = [r for r in markdown.splitlines() if r.startswith("| sub0 (classes 0-4) parameters")]
    assert rows and rows[0].endswith("x smaller |")
