"""BatchNorm folding (issue 19, item 1): exact on conv+BN and linear+BN, logged so a reload replays it, and
pruning still finds the conv channels afterwards."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.graph import InputSpec, ModelGraph
from modelpress.models import load
from modelpress.models.saving import load_saved, save
from tests.graph import structures
from tests.graph.test_structures import FACTORIES


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8, affine=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))))


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _inputs(g: ModelGraph) -> dict[str, torch.Tensor]:
    return g.example_inputs(4, seed=3)


def test_conv_bn_fold_is_exact_and_replayed_on_reload(tmp_path):
    g = load(FACTORIES["depthwise_se"])
    ref = g.forward(_inputs(g))
    pairs = g.fold_norms()
    bns = [m for m in g.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(pairs) >= 5 and not bns, (pairs, bns)  # every BN follows a conv here, depthwise ones too
    assert (g.forward(_inputs(g)) - ref).abs().max() < 1e-5
    assert [e["op"] for e in g.edits].count("fold_norm") == len(pairs)
    assert any(x.prunable and x.kind == "conv" for x in g.groups)  # the graph still traces and groups

    back = load_saved(save(g, tmp_path / "folded"))
    assert not [m for m in back.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (back.forward(_inputs(back)) - ref).abs().max() < 1e-5


def test_linear_bn_fold_is_exact():
    model = _perturbed(LinearBN())
    g = ModelGraph(model, InputSpec("tensor", ["x"], shape=(12,)), name="linear_bn")
    ref = g.forward(_inputs(g))
    assert g.fold_norms() == [("fc1", "bn1"), ("fc2", "bn2")]
    assert (g.forward(_inputs(g)) - ref).abs().max() < 1e-5
    assert g.module.fc2.bias is not None


def test_a_norm_whose_input_is_also_read_elsewhere_is_not_folded():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return (self.bn(y) + y).mean((2, 3))

    g = ModelGraph(_perturbed(Shared()), InputSpec("tensor", ["x"], shape=(3, 8, 8)), name="shared")
    ref = g.forward(_inputs(g))
    assert g.fold_norms() == []
    assert (g.forward(_inputs(g)) - ref).abs().max() == 0


def test_fold_keeps_residual_conv_blocks_exact():
    g = load(FACTORIES["one_block_stage"])
    _perturbed(g.module)
    ref = g.forward(_inputs(g))
    assert g.fold_norms()
    assert (g.forward(_inputs(g)) - ref).abs().max() < 1e-5
    assert structures  # the factories module is what FACTORIES names


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation module (timm.layers.BatchNormAct2d): normalize, then drop and act."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does something else: not folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_norm_with_its_own_activation_keeps_it_and_unknown_subclasses_stay():
    class ConvNormAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), ScaledBN(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3))

    g = ModelGraph(_perturbed(ConvNormAct()), InputSpec("tensor", ["x"], shape=(3, 8, 8)), name="norm_act")
    ref = g.forward(_inputs(g))
    assert g.fold_norms() == [("conv1", "bn1")]
    assert isinstance(g.module.bn2, ScaledBN) and isinstance(g.module.bn1[1], nn.ReLU)
    assert (g.forward(_inputs(g)) - ref).abs().max() < 1e-5
