"""`modelpress search` bad input: short errors, exit code 2, nothing written."""

from __future__ import annotations

import pytest

from modelpress.cli import main


def test_unknown_objective_and_missing_run_dir(tmp_path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as e:
        main(["search", "default", "--objectives", "quality,speed", "-o", str(tmp_path / "run")])
    assert e.value.code == 2 and "unknown objective 'speed'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:
        main(["search", "extract", str(tmp_path / "nothing"), "--point", "0", "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and "no finished search" in capsys.readouterr().err
