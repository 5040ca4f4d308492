"""The measurement agent on loopback: remote measurements equal local ones, the security rules hold, a
device that dies mid-measurement is retried then named in one short error, measurements never overlap."""

from __future__ import annotations

import hashlib
import http.client
import json
import pickle
import threading
import time
import zipfile
from pathlib import Path

import pytest

from modelpress.bench import get_target, measure
from modelpress.bench import remote as remote_mod
from modelpress.errors import ModelpressError
from modelpress.progress import Reporter
from modelpress.timing import onnx_digests
from tests.agent.conftest import FAST


class Recorder(Reporter):
    """A quiet reporter that keeps the log lines."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_remote_measurement_has_the_local_output_digest(devices, mlp_files):
    files, spec = mlp_files
    one, two = devices
    tgt = get_target(one.target)
    report = measure(files, spec, tgt, batch_sizes=[1, 8], memory=True, **FAST)
    local = get_target("ort-cpu", threads=1)
    feeds = {(b, None): spec.make(b) for b in (1, 8)}
    for name, path in files.items():
        assert report.variants[name].output_digests == onnx_digests(path, local, feeds), name
        s = report.stats(name, 8)
        assert s.runs == FAST["rounds"] * FAST["runs"] and len(s.round_medians_ms) == FAST["rounds"]
        assert s.peak_memory_mb is not None and s.peak_memory_mb > 0
    # the report describes the device: its address, its threads, its ONNX Runtime and CPU
    assert report.target["name"] == one.target and report.target["threads"] == 1
    assert report.system["threads"] == 1 and "CPUExecutionProvider" in report.system["ort_providers"]
    assert report.system["versions"]["onnxruntime"] and report.system["cpu_model"]
    # the same files again: nothing is uploaded twice (content-hash cache)
    uploads = one.info()["uploads"]
    assert uploads == 4  # two models, one external data file, the inputs
    measure(files, spec, tgt, batch_sizes=[1, 8], memory=False, **FAST)
    assert one.info()["uploads"] == uploads
    # node profiling (the INT8 speed guard's) runs on the device too: the same optimized graph's nodes
    remote_nodes = tgt.node_times(files["narrow"], spec.make(1), runs=3)
    assert set(remote_nodes) == set(local.node_times(files["narrow"], spec.make(1), runs=3))
    assert remote_nodes and all(v >= 0 for v in remote_nodes.values())
    # the device process never loaded torch
    maps = Path(f"/proc/{one.proc.pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()


def test_missing_or_wrong_token_is_refused_and_nothing_runs(devices, mlp_files, token_file, monkeypatch, capsys):
    files, spec = mlp_files
    agent = devices[1]
    before = agent.info()
    body = json.dumps({"variants": {"m": {"model": "0" * 64}}, "inputs": "0" * 64, "shapes": ["b1"]}).encode()
    data = Path(files["narrow"]).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}, {"Authorization": "Basic x"}):
        assert _raw(agent.port, "GET", "/v1/info", headers=headers) == 401
        assert _raw(agent.port, "POST", "/v1/measure", body, headers) == 401
        assert _raw(agent.port, "PUT", f"/v1/files/{sha}", data, {**headers, "X-Modelpress-Kind": "model"}) == 401
    after = agent.info()
    assert after["measurements"] == before["measurements"] and after["uploads"] == before["uploads"]
    assert after["refused"] == before["refused"] + 9
    # the client: one short error naming the device
    with pytest.raises(ModelpressError, match=r"refused the token \(401\)"):
        agent.client(token="wrong-token-wrong-token").info()
    monkeypatch.delenv("MODELPRESS_AGENT_TOKEN_FILE")
    with pytest.raises(ModelpressError, match="no token"):
        measure(files, spec, get_target(agent.target), batch_sizes=[1], **FAST)
    # the command line: one `error:` line, exit code 2, nothing measured
    from modelpress.cli import main

    monkeypatch.setenv("MODELPRESS_AGENT_TOKEN", "wrong-token-wrong-token")
    out = Path(files["narrow"]).with_name("bench.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(files["narrow"]), "--target", agent.target, "-o", str(out), "-q"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "401" in err[0] and agent.target in err[0] and len(err) <= 2
    # export picks its graph optimization by measuring on the target: its --token-file is refused the same way
    exported, wrong = out.with_name("exported.onnx"), out.with_name("wrong.token")
    wrong.write_text("wrong-token-wrong-token")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "modelpress.train.zoo:digits_cnn_factory", "--target", agent.target, "--token-file", str(wrong),
              "-o", str(exported), "-q"])
    assert exit_info.value.code == 2 and "401" in capsys.readouterr().err and not exported.exists()
    monkeypatch.delenv("MODELPRESS_AGENT_TOKEN", raising=False)  # a --token-file replaces the variable
    monkeypatch.setenv("MODELPRESS_AGENT_TOKEN_FILE", str(token_file))
    assert not out.exists() and agent.info()["measurements"] == before["measurements"]


def test_uploads_over_the_limit_or_not_onnx_are_refused(fresh_agent, mlp_files, tmp_path):
    files, spec = mlp_files
    cache = tmp_path / "cache"
    agent = fresh_agent(1, "--max-upload-mb", "0.05", "--cache-dir", str(cache))  # 51 KiB: the narrow MLP fits
    token = {"Authorization": "Bearer " + agent.client().token}
    limit = agent.info()["max_upload_bytes"]
    # declared too large: refused before the body is read
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    conn.putrequest("PUT", "/v1/files/" + "a" * 64)
    for k, v in {**token, "Content-Length": str(limit + 1), "X-Modelpress-Kind": "data"}.items():
        conn.putheader(k, v)
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    # streamed without a length: refused once it passes the limit, and nothing is kept
    blob = b"\0" * (limit + 4096)
    sha = hashlib.sha256(blob).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    conn.request("PUT", f"/v1/files/{sha}", body=iter([blob[i:i + 8192] for i in range(0, len(blob), 8192)]),
                 headers={**token, "X-Modelpress-Kind": "data"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    assert _raw(agent.port, "HEAD", f"/v1/files/{sha}", headers=token) == 404
    # the client says so before sending anything
    with pytest.raises(ModelpressError, match="upload limit"):
        measure({"wide": files["wide"]}, spec, get_target(agent.target), batch_sizes=[1], **FAST)
    # not ONNX: a pickle, a zip (a torch checkpoint's container), random bytes: 415, never stored
    for payload in (pickle.dumps({"weights": [1.0, 2.0]}), _zip_bytes(tmp_path), b"\x08\x07" + bytes(range(200))):
        psha = hashlib.sha256(payload).hexdigest()
        assert _raw(agent.port, "PUT", f"/v1/files/{psha}", payload, {**token, "X-Modelpress-Kind": "model"}) == 415
        assert _raw(agent.port, "HEAD", f"/v1/files/{psha}", headers=token) == 404
    # a measurement naming a file that was refused finds it missing, and runs nothing
    body = json.dumps({"variants": {"m": {"model": psha}}, "inputs": psha, "shapes": ["b1"]}).encode()
    assert _raw(agent.port, "POST", "/v1/measure", body, token) == 409
    # external data may not leave the model's folder
    bad = json.dumps({"variants": {"m": {"model": psha, "data": {"../x": psha}}}, "inputs": psha,
                      "shapes": ["b1"]}).encode()
    assert _raw(agent.port, "POST", "/v1/measure", bad, token) == 400
    assert agent.info()["measurements"] == 0
    # an ONNX model whose external data points outside its folder: the client refuses to send it, and the
    # device's ONNX Runtime refuses to load it (422), so no file outside the work folder is ever read
    evil = _outside_data_model(tmp_path / "evil.onnx")
    with pytest.raises(ModelpressError, match="external data outside its folder"):
        measure({"evil": evil}, spec, get_target(agent.target), batch_sizes=[1], **FAST)
    esha = hashlib.sha256(evil.read_bytes()).hexdigest()
    assert _raw(agent.port, "PUT", f"/v1/files/{esha}", evil.read_bytes(), {**token, "X-Modelpress-Kind": "model"}) == 201
    inputs = remote_mod.inputs_archive({(1, None): {"x": spec.make(1)["x"][:, :4].copy()}})
    isha = hashlib.sha256(inputs).hexdigest()
    assert _raw(agent.port, "PUT", f"/v1/files/{isha}", inputs, {**token, "X-Modelpress-Kind": "inputs"}) == 201
    body = json.dumps({"variants": {"evil": {"model": esha}}, "inputs": isha, "shapes": ["b1"]}).encode()
    assert _raw(agent.port, "POST", "/v1/measure", body, token) == 422
    # the real ONNX file that fits is accepted and measured
    report = measure({"narrow": files["narrow"]}, spec, get_target(agent.target), batch_sizes=[1], **FAST)
    assert report.stats("narrow", 1).median_ms > 0
    # inputs the model cannot take (4 features, not 64): one short answer, and the agent serves on
    nsha = hashlib.sha256(Path(files["narrow"]).read_bytes()).hexdigest()
    body = json.dumps({"variants": {"narrow": {"model": nsha}}, "inputs": isha, "shapes": ["b1"]}).encode()
    assert _raw(agent.port, "POST", "/v1/measure", body, token) == 500
    assert agent.info()["busy"] is False
    # every measurement's folder and every refused upload are gone; the cache holds the two accepted files
    assert not list((cache / "work").iterdir()) and not list((cache / "incoming").iterdir())
    assert len(list((cache / "files").iterdir())) == 4  # the evil model and its inputs, the MLP and its inputs
    agent.stop()
    assert not (cache / "work").exists() and agent.proc.returncode == 0


def _outside_data_model(path: Path) -> Path:
    """y = x + w with w's external data at /etc/hostname."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((4,), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for key, value in (("location", "/etc/hostname"), ("offset", "0"), ("length", "4")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", io[:1], io[1:], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _zip_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "ckpt.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1, 2, 3]))
    return path.read_bytes()


def test_an_agent_killed_mid_measurement_is_retried_then_named(fresh_agent, mlp_files, monkeypatch, capsys,
                                                                tmp_path):
    files, spec = mlp_files
    agent = fresh_agent(1, "--cache-dir", str(tmp_path / "cache"))  # killed: its folder is left to the test
    monkeypatch.setattr(remote_mod, "RETRY_DELAYS_S", (0.1, 0.2, 0.4))

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not agent.info()["busy"]:
            time.sleep(0.05)
        agent.kill()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    from modelpress.cli import main

    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(files["narrow"]), "--target", agent.target, "--rounds", "50", "-o", str(out)])
    killer.join()
    assert exit_info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("error:", "  ->"))]
    assert err[0].startswith(f"error: the device {agent.target} stopped answering") and "4 tries" in err[0], err
    assert not out.exists()  # no partial output
    # the retries are logged (through the reporter) before the error
    rec = Recorder()
    with pytest.raises(ModelpressError, match="connection refused"):
        measure(files, spec, get_target(agent.target), batch_sizes=[1], reporter=rec, **FAST)
    assert [ln for ln in rec.lines if "trying again" in ln] and len(rec.lines) == 3


def test_concurrent_measurements_on_one_device_are_serialized(devices, mlp_files):
    files, spec = mlp_files
    agent = devices[0]
    tgt = get_target(agent.target)
    runs: dict[str, remote_mod.RemoteRun] = {}
    shapes = [(8, None)]
    feeds = {s: spec.make(s[0]) for s in shapes}
    timing = {"runs": 3, "warmup": 1, "max_runs": 10_000, "max_time_s": 60.0, "memory": False}

    def one(name: str, rounds: int, min_time_s: float) -> None:
        runs[name] = remote_mod.measure_remote(tgt, {name: files["narrow"]}, feeds, shapes, rounds=rounds,
                                               min_time_s=min_time_s, **timing)

    first = threading.Thread(target=one, args=("first", 3, 0.4))
    first.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not agent.info()["busy"]:
        time.sleep(0.02)
    others = [threading.Thread(target=one, args=(f"next{i}", 1, 0.05)) for i in range(2)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    spans = sorted((r.started, r.finished, name) for name, r in runs.items())
    assert len(spans) == 3
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"{a} and {b} overlapped"
    # the two later ones arrived while the first was timing, and waited for it
    assert all(runs[n].arrived < runs["first"].finished <= runs[n].started for n in ("next0", "next1"))


def test_bench_command_on_a_device_prints_the_table_and_the_device(devices, mlp_files, token_file, tmp_path,
                                                                  monkeypatch, capsys):
    from modelpress.cli import main

    files, _ = mlp_files
    agent = devices[1]
    monkeypatch.delenv("MODELPRESS_AGENT_TOKEN_FILE")  # the option, not the environment, carries the token
    out = tmp_path / "bench.json"
    main(["bench", str(files["narrow"]), "--target", agent.target, "--token-file", str(token_file), "--batch", "1",
          "--rounds", "1", "-o", str(out)])
    printed = capsys.readouterr().out
    assert f"latency on {agent.target} (2 threads)" in printed and "narrow" in printed
    data = json.loads(out.read_text())
    assert data["target"]["address"] == f"http://127.0.0.1:{agent.port}" and data["target"]["threads"] == 2
    system = data["system"]
    assert system["threads"] == 2 and system["cpu_model"] and "accelerators" in system
    assert system["ort_version"] == system["versions"]["onnxruntime"] and "CPUExecutionProvider" in system["ort_providers"]
    assert data["variants"]["narrow"]["output_digests"]["b1"]
