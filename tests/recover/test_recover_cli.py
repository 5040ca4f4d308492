"""Ctrl-C during `modelpress compress` with a recover pass: a short message, no output folder, a checkpoint
beside it; the same command run again resumes the recovery, finishes, and leaves no checkpoint behind."""

from __future__ import annotations

import json
import signal

import pytest

from modelpress.cli import main
from modelpress.progress import Reporter


class _CtrlCAtStep(Reporter):
    """A quiet reporter that sends SIGINT as the training reaches step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__(quiet=True)
        self.at = at

    def track(self, items, description, total=None):  # noqa: ANN001, ANN201
        for i, item in enumerate(items):
            if i == self.at and description == "training":
                signal.raise_signal(signal.SIGINT)
            yield item


def test_interrupted_compress_resumes_its_recovery(tmp_path, monkeypatch, capsys, zoo_cnn) -> None:  # noqa: ANN001
    import modelpress.cli.compress as compress_cli
    from modelpress.compress.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "_measure", lambda *a, **k: {})  # latency is beside the point here

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "passes:\n  - pass: prune.magnitude\n    ratios: {conv: 0.5}\n"
        "  - pass: recover\n    steps: 24\n    checkpoint_every: 8\n    lr: 0.003\n"
        "export:\n  optimize: none\n"
    )
    out = tmp_path / "out"
    args = ["compress", "modelpress.train.zoo:digits_cnn_factory", "-r", str(recipe), "--data", "digits",
            "-o", str(out), "--json", "-q"]
    monkeypatch.setattr(compress_cli, "reporter", lambda quiet: _CtrlCAtStep(13))
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "aborted" in err and "run the same command again" in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))  # nothing half-written
    saved = list((tmp_path / ".out.checkpoints").glob("recover-*/train-checkpoint.safetensors"))
    assert len(saved) == 1

    monkeypatch.setattr(compress_cli, "reporter", lambda quiet: Reporter(quiet=True))
    main(args)
    report = json.loads(capsys.readouterr().out)
    recovery = report["passes"][1]
    assert recovery["resumed"] and recovery["steps"] == 24 and recovery["steps_this_run"] == 24 - 14
    assert report["quality"]["after"]["accuracy"] > 0.8  # from about 0.23 after pruning
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".out.checkpoints").exists()
