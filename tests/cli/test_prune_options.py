"""`modelpress prune` options reach the recipe it builds (no model is run)."""

from __future__ import annotations

import pytest

from modelpress.cli import compress as cli_compress
from modelpress.cli import main


@pytest.mark.parametrize(("args", "name"), [(["--method", "magnitude"], "prune.magnitude"),
                                            (["--target-params", "0.5"], "prune.global")])
@pytest.mark.parametrize("flag", [True, False])
def test_reconstruct_flag_reaches_the_pruning_pass(monkeypatch, args, name, flag):  # noqa: ANN001
    seen = {}
    monkeypatch.setattr(cli_compress, "run_recipe", lambda recipe, *rest: seen.setdefault("recipe", recipe))
    main(["prune", *args, "--reconstruct" if flag else "--no-reconstruct"])
    step = seen["recipe"].passes[0]
    assert step.name == name and step.config.reconstruct is flag
