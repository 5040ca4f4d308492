"""The super-network: re-ordering is exact, the largest sub-network is the original model, an extracted
sub-network equals the super-network run with the same config, and sandwich fine-tuning trains and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.search import SearchSpace, SuperNet


@pytest.fixture(scope="module")
def net(vit_graph, vit_data):  # noqa: ANN001
    from modelpress.data.tasks import ClassificationTask

    space = SearchSpace.from_graph(vit_graph, head_dim_fractions=(0.5, 1.0), embed_fractions=(0.5, 0.75, 1.0))
    return SuperNet.from_graph(vit_graph, space, saliency="hessian", data=vit_data.calibration,
                               task=ClassificationTask(), max_batches=1)


def test_reordering_is_exact_and_moves_units(net, vit_graph) -> None:  # noqa: ANN001
    check = net.graph.verify(vit_graph, atol=1e-5)
    assert check["ok"], check
    moved = [n for n, order in net.graph.lineage.items() if not np.array_equal(order, np.arange(len(order)))]
    assert any(n.startswith("mlp:") for n in moved) and any(n.startswith("head:") for n in moved)


def test_largest_is_the_original(net, vit_graph) -> None:  # noqa: ANN001
    x = vit_graph.example_inputs(4, seed=3)
    largest = net.space.largest()
    assert torch.allclose(net.forward(largest, x), vit_graph.forward(x), atol=1e-5)
    assert net.extract(largest).num_parameters() == vit_graph.num_parameters()


def test_extracted_subnetwork_equals_the_masked_supernetwork(net, vit_graph) -> None:  # noqa: ANN001
    from modelpress.passes import Context
    from modelpress.search.evaluate import EvalSettings, Evaluator

    ev = Evaluator(net, Context(workdir="."), EvalSettings(objectives=["quality", "size"]))
    x = vit_graph.example_inputs(3, seed=5)
    rng = np.random.default_rng(1)
    configs = [net.space.smallest()] + [net.space.random(rng) for _ in range(2)]
    configs[1]["blocks"][0]["keep"] = False  # one with a skipped block at least
    for config in configs:
        sub = net.extract(config)
        masked, dense = net.forward(config, x), sub.forward(x)
        assert dense.shape == masked.shape
        assert torch.allclose(masked, dense, atol=1e-4), float((masked - dense).abs().max())
        assert sub.num_parameters() < vit_graph.num_parameters()
        # the analytic parameter count (used for the size objective) is the extracted model's
        assert round(sum(ev.param_counts(config).values())) == sub.num_parameters()
    assert net.graph.num_parameters() == vit_graph.num_parameters()  # the super-network is untouched


def test_bad_configs_and_empty_spaces_are_short_errors(net, vit_graph) -> None:  # noqa: ANN001
    bad = net.space.largest()
    bad["blocks"][0]["mlp"] = 7
    with pytest.raises(ModelpressError, match="mlp=7"):
        net.extract(bad)
    with pytest.raises(ModelpressError, match="empty"):
        SearchSpace.from_graph(vit_graph, head_fractions=(1.0,), mlp_fractions=(1.0,), skip_blocks=False,
                               precisions=("float",))


def test_sandwich_finetuning_trains_and_resumes(vit_graph, vit_data, tmp_path) -> None:  # noqa: ANN001
    from modelpress.data.tasks import ClassificationTask
    from modelpress.search.instatune import finetune_supernet
    from modelpress.train import TrainConfig

    torch.set_num_threads(1)
    space = SearchSpace.from_graph(vit_graph, precisions=("float",))
    kw = dict(lr=1e-4, batch_size=8, schedule_steps=4, checkpoint_every=1)

    def run(folder, steps, resume=False):  # noqa: ANN001, ANN202
        net = SuperNet.from_graph(vit_graph, space)
        cfg = TrainConfig(steps=steps, checkpoint_dir=folder, **kw)
        res = finetune_supernet(net, vit_data.calibration, task=ClassificationTask(), config=cfg, n_random=1,
                                resume=resume)
        return net, res

    a, ra = run(tmp_path / "a", 4)
    assert ra.steps == 4 and np.isfinite(ra.final_loss)
    before = SuperNet.from_graph(vit_graph, space).graph.state()
    assert any(not torch.equal(before[k], v) for k, v in a.graph.state().items())  # weights moved
    run(tmp_path / "b", 2)
    b, rb = run(tmp_path / "b", 4, resume=True)
    assert rb.resumed and rb.steps == 4
    sa, sb = a.graph.state(), b.graph.state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sandwich_runs_each_subnetwork_once_without_dropout_noise(vit_graph, vit_data, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """One step computes the largest sub-network once (its detached output is the others' target), the frozen
    original is the largest's target, and the super-network trains without dropout."""
    from modelpress.data.tasks import ClassificationTask
    from modelpress.search.instatune import finetune_supernet
    from modelpress.train import TrainConfig

    torch.set_num_threads(1)
    space = SearchSpace.from_graph(vit_graph, precisions=("float",))
    net = SuperNet.from_graph(vit_graph, space)
    calls: list[tuple[str, bool]] = []
    real = SuperNet.masked_module_call

    def spy(self, config, inputs, masks=None):  # noqa: ANN001, ANN202
        name = "largest" if config == space.largest() else "smallest" if config == space.smallest(skip=True) else "other"
        calls.append((name, self.graph.module.training))
        return real(self, config, inputs, masks)

    monkeypatch.setattr(SuperNet, "masked_module_call", spy)
    cfg = TrainConfig(steps=2, lr=1e-4, batch_size=8, dropout=True)
    finetune_supernet(net, vit_data.calibration, task=ClassificationTask(), config=cfg, n_random=1)
    assert [n for n, _ in calls] == ["smallest", "other", "largest"] * 2  # the largest last: hidden states
    assert not any(training for _, training in calls)  # eval mode: no dropout in the in-place targets


def test_sandwich_hidden_state_distillation_matches_the_largest_to_the_original(vit_graph, vit_data) -> None:  # noqa: ANN001
    """With ``hidden_weight`` the largest sub-network's block outputs are matched to the frozen original's: at
    the first step the largest is the original (re-ordered), so the loss is the one without the hidden term
    (it would not be if the captured block outputs were another sub-network's); later steps differ."""
    from modelpress.data.tasks import ClassificationTask
    from modelpress.search.instatune import finetune_supernet
    from modelpress.train import TrainConfig

    torch.set_num_threads(1)
    space = SearchSpace.from_graph(vit_graph, precisions=("float",))

    def run(hidden_weight: float):  # noqa: ANN202
        net = SuperNet.from_graph(vit_graph, space)
        cfg = TrainConfig(steps=3, lr=1e-3, batch_size=8, log_every=1, hidden_weight=hidden_weight)
        res = finetune_supernet(net, vit_data.calibration, task=ClassificationTask(), config=cfg, n_random=1)
        return [loss for _, loss in res.losses], net.graph.state()

    plain, a = run(0.0)
    hidden, b = run(10.0)
    assert hidden[0] == pytest.approx(plain[0], rel=1e-5, abs=1e-7), (plain, hidden)
    assert hidden[2] > plain[2] + 1e-6, (plain, hidden)  # the largest has moved away from the original
    assert any(not torch.equal(a[k], b[k]) for k in a)
