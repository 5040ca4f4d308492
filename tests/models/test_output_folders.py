"""Output folders: modes follow the user's umask, and a folder that appears while a run works (another run's
result) is never removed; with overwrite the old folder is replaced only once the new one is complete."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from modelpress.errors import ModelpressError
from modelpress.models import load_saved, save
from modelpress.models.saving import staged_dir
from tests.graph.models_zoo import fresh


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    """The permission bits of every folder (``root`` included) and every file under ``root``."""
    dirs = {stat.S_IMODE(root.stat().st_mode)}
    files = set()
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files).add(stat.S_IMODE(p.stat().st_mode))
    return dirs, files


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_folder_follows_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    out = save(fresh("fused"), tmp_path / "m")
    dirs, files = _modes(out)
    assert dirs == {dir_mode} and files == {file_mode}, (oct(mask), dirs, files)
    assert load_saved(out).name  # and it still reloads


@pytest.mark.usefixtures("short_timing")
def test_cli_output_folder_follows_the_umask(tmp_path, umask):
    from modelpress.cli import main

    umask(0o022)
    out = tmp_path / "fp32"
    main(["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", "fp32", "--data", "digits", "-o", str(out),
          "-q"])
    dirs, files = _modes(out)
    assert dirs == {0o755} and files == {0o644}, (dirs, files)
    assert {"model.onnx", "model.safetensors", "report.json"} <= {p.name for p in out.iterdir()}


def test_an_output_that_appeared_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelpressError) as info, staged_dir(out) as tmp:
        (tmp / "mine.txt").write_text("this run")
        out.mkdir()  # another run finished first (an empty folder too: a plain rename would replace it)
        (out / "theirs.txt").write_text("other run")
    message = str(info.value)
    assert f"output {out} appeared while this run worked" in message and "--overwrite" in message
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]  # the other run's result is untouched
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.") and p.name.endswith(".kept")]
    assert len(kept) == 1 and str(kept[0]) in message
    assert (kept[0] / "mine.txt").read_text() == "this run"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_an_empty_folder_that_appeared_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelpressError), staged_dir(out) as tmp:
        (tmp / "mine.txt").write_text("this run")
        out.mkdir()
    assert out.is_dir() and not any(out.iterdir())


def test_overwrite_replaces_only_a_complete_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("the run failed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # a failed run leaves the old result

    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
