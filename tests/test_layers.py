"""The package layers of ARCHITECTURE.md hold: import-linter's contracts (pyproject.toml) are all kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(capsys):
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the contracts name packages relative to the src layout the installed package points at
    try:
        code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "BROKEN" not in out and "KEPT" in out


def test_every_package_is_in_a_layer():
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for row in layers for name in row.replace(":", "|").split("|")}
    src = ROOT / "src" / "modelpress"
    packages = {p.name for p in src.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in src.glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= named, f"not in any layer: {sorted((packages | modules) - named)}"


def test_no_import_cycle_between_files_of_a_package():
    """Inside every package, files import one way (lazy imports inside functions count): no two files of
    one package reach each other through that package's files."""
    grimp = pytest.importorskip("grimp", reason="import-linter (dev extra) brings grimp")
    graph = grimp.build_graph("modelpress", cache_dir=None)
    packages: dict[str, set[str]] = {}
    for module in graph.modules:
        packages.setdefault(module.rpartition(".")[0], set()).add(module)
    cycles = []
    for members in packages.values():
        edges = {m: graph.find_modules_directly_imported_by(m) & members for m in members}
        reach = {m: _reachable(m, edges) for m in members}
        cycles += sorted(f"{a} <-> {b}" for a in members for b in reach[a] if a < b and a in reach[b])
    assert not cycles, "import cycles between files: " + "; ".join(cycles[:20])


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
