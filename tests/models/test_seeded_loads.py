"""timm / torchvision loads without weights draw their random weights from the run's seed (issue 19 item 6):
two loads of one spec and seed are the same model, other seeds differ, and the global RNG is untouched."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vision

# small enough to build in well under a second each
SPECS = [("torchvision", "torchvision:mobilenet_v3_small"), ("timm", "timm:levit_128s")]


def _state(graph) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in graph.module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("package", "spec"), SPECS)
def test_same_spec_and_seed_give_the_same_weights(package, spec):
    pytest.importorskip(package)
    from modelpress.models import load

    first = load(spec)
    torch.rand(7)  # whatever the global RNG did in between does not matter
    assert _same(_state(first), _state(load(spec)))
    assert first.source["seed"] == 0
    assert _same(_state(load(spec, seed=3)), _state(load(spec, seed=3)))


@pytest.mark.parametrize(("package", "spec"), SPECS)
def test_other_seeds_give_other_weights(package, spec):
    pytest.importorskip(package)
    from modelpress.models import load

    a, b = _state(load(spec, seed=0)), _state(load(spec, seed=1))
    differ = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1 and not torch.equal(a[k], b[k])]
    assert differ, "seeds 0 and 1 drew the same weights"


@pytest.mark.parametrize(("package", "spec"), SPECS)
def test_a_load_leaves_the_global_rng_alone(package, spec):
    pytest.importorskip(package)
    from modelpress.models import load

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    expected = torch.rand(5)
    torch.set_rng_state(before)
    load(spec, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(5), expected)


def test_the_cli_loader_passes_the_command_seed():
    pytest.importorskip("torchvision")
    from modelpress.cli.common import load_graph
    from modelpress.models import load
    from modelpress.progress import Reporter

    rep = Reporter(quiet=True)
    spec = "torchvision:mobilenet_v3_small"
    assert _same(_state(load_graph(spec, False, None, rep, 2)), _state(load(spec, seed=2)))
    assert _same(_state(load_graph(spec, False, None, rep)), _state(load(spec)))  # commands without --seed: 0


def test_build_rebuilds_the_random_weights_of_the_load():
    """``build`` (the architecture of a saved model) draws the load's weights again; ``load_saved`` then
    loads the saved weights over them anyway, so a reloaded model never depends on this."""
    pytest.importorskip("torchvision")
    from modelpress.models import build, load

    g = load("torchvision:mobilenet_v3_small", seed=4)
    assert _same(_state(g), dict(build(g.source).state_dict()))
    old = {k: v for k, v in g.source.items() if k != "seed"}  # saved before the seed was recorded
    assert _same(dict(build(old).state_dict()), _state(load("torchvision:mobilenet_v3_small")))


def test_saved_random_model_reloads_its_own_weights(tmp_path):
    pytest.importorskip("torchvision")
    from modelpress.models import load, load_saved, save

    g = load("torchvision:mobilenet_v3_small", seed=6)
    save(g, tmp_path / "saved")
    assert _same(_state(load_saved(tmp_path / "saved")), _state(g))
