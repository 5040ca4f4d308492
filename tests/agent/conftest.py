"""Agents on loopback for the tests: real `python -m modelpress.agent` processes on free ports, two of them
with different thread counts standing for two devices, and small real ONNX models."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class Agent:
    """One running agent process."""

    proc: subprocess.Popen
    port: int
    threads: int

    @property
    def target(self) -> str:
        return f"remote:127.0.0.1:{self.port}"

    def client(self, token: str | None = None):  # noqa: ANN201
        from modelpress.bench.remote import AgentClient
        from modelpress.targets import get_target

        return AgentClient(get_target(self.target), token=token)

    def info(self) -> dict:
        return self.client().info()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


# A device's own install (`pip install modelpress[agent]`, no torch) to run the agents from, when given (CI
# builds one); otherwise this interpreter with the source tree.
AGENT_PYTHON = os.environ.get("MODELPRESS_AGENT_PYTHON")


def start_agent(token_file: Path, threads: int, *extra: str) -> Agent:
    """Start an agent on a free loopback port; returns once it listens (its first line names the port)."""
    if AGENT_PYTHON:
        python, env = AGENT_PYTHON, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    else:
        python, env = sys.executable, {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [python, "-m", "modelpress.agent", "--port", "0", "--token-file", str(token_file),
         "--threads", str(threads), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline()
    match = re.search(r"https?://127\.0\.0\.1:(\d+) ", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"agent did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return Agent(proc, int(match.group(1)), threads)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("agent") / "token"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def _token_env(token_file, monkeypatch):  # noqa: ANN001, ANN202
    """Clients read the token from the file the agents were started with (as --token-file does)."""
    monkeypatch.delenv("MODELPRESS_AGENT_TOKEN", raising=False)
    monkeypatch.setenv("MODELPRESS_AGENT_TOKEN_FILE", str(token_file))


@pytest.fixture(scope="session")
def devices(token_file):  # noqa: ANN001, ANN201
    """Two devices: agents with 1 and 2 threads, started together."""
    agents = [start_agent(token_file, 1), start_agent(token_file, 2)]
    yield agents
    for a in agents:
        a.stop()


@pytest.fixture
def fresh_agent(token_file):  # noqa: ANN001, ANN201
    """Start an agent for one test (extra options allowed); stopped after it."""
    started: list[Agent] = []

    def start(threads: int = 1, *extra: str) -> Agent:
        started.append(start_agent(token_file, threads, *extra))
        return started[-1]

    yield start
    for a in started:
        a.stop()


def _mlp(width: int):  # noqa: ANN202
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, 10)).eval()


def export_mlp(path: Path, width: int = 256, external: bool = False) -> Path:
    """A small MLP on 64 features as ONNX (dynamic batch); ``external``: weights in ``NAME.data``."""
    import onnx
    import torch

    torch.onnx.export(_mlp(width), (torch.zeros(1, 64),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False, opset_version=17)
    if external:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    return path


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory):  # noqa: ANN001, ANN201
    """Two MLPs (widths 256 and 64; the first with external data) and their input spec."""
    import warnings

    from modelpress.graph.inputs import InputSpec

    folder = tmp_path_factory.mktemp("models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = export_mlp(folder / "wide.onnx", 256, external=True)
        narrow = export_mlp(folder / "narrow.onnx", 64)
    return {"wide": wide, "narrow": narrow}, InputSpec("tensor", ["x"], shape=(64,))


FAST = {"rounds": 2, "runs": 3, "min_time_s": 0.0, "warmup": 1}
