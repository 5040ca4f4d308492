"""`modelpress fuse` on bad input: models of other architectures, parents whose head widths differ, a target
wider than the anchor (a fraction above 1, or more units than it has), a Sinkhorn plan that did not converge. A text model beside a vision one is
told apart before the data reaches it. Each is exit code 2, one short line
naming the problem and what to do (no traceback, never "the data does not fit"), and no output folder."""

from __future__ import annotations

import pytest

pytest.importorskip("ot")
pytest.importorskip("sklearn")

from modelpress.models.saving import save  # noqa: E402
from tests.fuse.tiny import digits_vit  # noqa: E402
from tests.graph.models_zoo import fresh  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    thin = digits_vit(2)
    thin.remove_many([(g.name, list(range(8))) for g in thin.groups if g.kind == "head_dim"])
    models = {"a": digits_vit(1), "b": digits_vit(2), "shallow": digits_vit(5, layers=1), "thin": thin,
              "bert": fresh("bert")}
    return {name: str(save(graph, root / name)) for name, graph in models.items()}


def fails_cleanly(args: list[str], tmp_path, capsys) -> str:  # noqa: ANN001
    """Runs ``modelpress fuse ARGS -o OUT``: exit code 2, no traceback, nothing written; returns stderr."""
    from modelpress.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["fuse", *args, "--data", "digits", "--samples", "16", "--quiet", "-o", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and "bug" not in err and "does not fit" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) <= 2  # the problem, and what to do
    assert not out.exists() and not list(tmp_path.iterdir())
    return err


@pytest.mark.parametrize("other,problem", [("bert", "differ: inputs text"),  # the digits never reach it
                                           ("shallow", "differ: depth 1 vs 2 blocks"),
                                           ("thin", "differ: head width of head_dim:vit.layers.0.attention: 8 vs 16")])
def test_models_that_differ_are_told_apart(checkpoints, other, problem, tmp_path, capsys):
    err = fails_cleanly([checkpoints["a"], checkpoints[other]], tmp_path, capsys)
    assert problem in err and "fuse models of one architecture" in err


@pytest.mark.parametrize("width,problem", [("mlp=2.0", "width mlp=2 is wider than the anchor"),
                                           ("mlp=1.5", "width mlp=1.5 is wider than the anchor"),
                                           ("mlp=128", "mlp=128 (128 units) is wider than the anchor's")])
def test_a_target_wider_than_the_anchor_is_refused(checkpoints, width, problem, tmp_path, capsys):
    err = fails_cleanly([checkpoints["a"], checkpoints["b"], "--width", width], tmp_path, capsys)
    assert problem in err and "narrower" in err


def test_a_sinkhorn_plan_that_did_not_converge_is_refused(checkpoints, tmp_path, capsys):
    err = fails_cleanly([checkpoints["a"], checkpoints["b"], "--alignment", "soft", "--reg", "1e-6"], tmp_path, capsys)
    assert "the Sinkhorn plan did not converge" in err and "raise reg" in err
