"""A device has no torch: the agent, its server and its measurement path load none (checked in a fresh
process, as import-linter's contract checks the imports statically)."""

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
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "modelpress"))))
"""


def test_importing_the_agent_loads_no_torch():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "modelpress.agent.server" in loaded and "modelpress.timing" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")], loaded
    heavy = {"modelpress.bench", "modelpress.graph", "modelpress.export", "modelpress.data"}
    assert not heavy & set(loaded), loaded
