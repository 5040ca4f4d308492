"""A device has no torch: the agent, its server and its measurement path load none, nor any other package a
device would not have (checked in a fresh process, as import-linter's contract checks the imports
statically)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import modelpress.agent
import modelpress.agent.__main__
from modelpress.agent.server import AgentSettings, create_app
from modelpress.agent.store import Store
from modelpress.timing import interleave, onnx_digests, probe_onnx_memory
tmp = Path(tempfile.mkdtemp())
app = create_app(AgentSettings(token="x" * 24, threads=1), Store(tmp, 2**20, 2**21))
third_party = {m.split(".")[0] for m in sys.modules if not m.startswith("_")} - set(sys.stdlib_module_names)
print(json.dumps(sorted(third_party)))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "modelpress"))))
"""
# what a device needs besides the standard library: onnxruntime, numpy and the server library (starlette and
# the packages it brings; uvicorn is imported when serving)
DEVICE_PACKAGES = {"modelpress", "numpy", "onnxruntime", "starlette", "anyio", "sniffio", "idna", "typing_extensions"}


def test_importing_the_agent_loads_no_torch():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *_, third_party, loaded = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert set(third_party) <= DEVICE_PACKAGES, sorted(set(third_party) - DEVICE_PACKAGES)
    assert "modelpress.agent.server" in loaded and "modelpress.timing" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")], loaded
    heavy = {"modelpress.bench", "modelpress.graph", "modelpress.export", "modelpress.data"}
    assert not heavy & set(loaded), loaded
