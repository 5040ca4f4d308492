"""Saved models carry their unit lineage: written beside the edit log, replayed and checked on reload."""

from __future__ import annotations

import json

import pytest

from modelpress.errors import ModelpressError
from modelpress.models import load_saved, save
from modelpress.models.loaders import SPEC_FILE
from tests.graph.models_zoo import fresh


@pytest.fixture(scope="module")
def edited():
    g = fresh("fused")
    g.remove("mlp:blocks.0", [0, 9, 10])
    g.slice("head:blocks.1.attn", [3, 1])
    g.remove_block("blocks.0")
    return g


def test_spec_records_lineage_and_reload_replays_it(edited, tmp_path):
    save(edited, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / SPEC_FILE).read_text())
    # blocks.0 was deleted: the sliced heads of blocks.1 now live at blocks.0
    assert spec["lineage"] == {"groups": {"head:blocks.0.attn": [3, 1]}, "blocks": {"blocks": [1]}}
    again = load_saved(tmp_path / "m")
    assert again.lineage_record() == spec["lineage"]
    assert again.lineage["head:blocks.0.attn"].tolist() == [3, 1]
    assert again.original_name("head:blocks.0.attn") == "head:blocks.1.attn"


def test_tampered_lineage_is_refused(edited, tmp_path):
    save(edited, tmp_path / "m")
    path = tmp_path / "m" / SPEC_FILE
    spec = json.loads(path.read_text())
    spec["lineage"]["groups"]["head:blocks.0.attn"] = [0, 1]
    path.write_text(json.dumps(spec))
    with pytest.raises(ModelpressError, match="lineage"):
        load_saved(tmp_path / "m")


def test_files_without_lineage_say_it_is_unknown(edited, tmp_path):
    save(edited, tmp_path / "m")
    path = tmp_path / "m" / SPEC_FILE
    spec = json.loads(path.read_text())
    del spec["lineage"]
    path.write_text(json.dumps(spec))
    again = load_saved(tmp_path / "m")  # still loads and runs
    assert again.forward(again.example_inputs(1)).shape[-1] == 10
    with pytest.raises(ModelpressError, match="before modelpress recorded unit lineage"):
        again.lineage  # noqa: B018
