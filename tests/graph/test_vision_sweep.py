"""Sweep: prune every prunable group of torchvision and timm models by ~30%, run, export and compare.

Random weights. The representative subset (every failure class the graph must handle: per-head bias
tables, depthwise and grouped convolutions, attention attributes, averaged classifier heads, plus
``swin_t`` and ``inception_v3``) always runs in the vision stage; the full lists run with
``MODELPRESS_VISION_SWEEP=full`` (every torchvision classification model under 30M parameters and the
timm list below). A model that cannot be pruned must still pass: every group it does not offer is fixed
with a reason, and the pruned model runs, keeps its output shape and exports.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vision

FRACTION = 0.3

# every torchvision classification model under 30M parameters (torchvision 0.29: 40 of 80)
TORCHVISION = [
    "squeezenet1_1", "squeezenet1_0", "shufflenet_v2_x0_5", "mnasnet0_5", "shufflenet_v2_x1_0",
    "mobilenet_v3_small", "mnasnet0_75", "shufflenet_v2_x1_5", "mobilenet_v2", "regnet_y_400mf", "mnasnet1_0",
    "efficientnet_b0", "mobilenet_v3_large", "regnet_x_400mf", "mnasnet1_3", "regnet_y_800mf", "regnet_x_800mf",
    "shufflenet_v2_x2_0", "efficientnet_b1", "densenet121", "efficientnet_b2", "regnet_x_1_6gf",
    "regnet_y_1_6gf", "resnet18", "efficientnet_b3", "googlenet", "densenet169", "regnet_x_3_2gf",
    "efficientnet_b4", "regnet_y_3_2gf", "densenet201", "efficientnet_v2_s", "resnet34", "resnext50_32x4d",
    "resnet50", "inception_v3", "swin_t", "swin_v2_t", "convnext_tiny", "densenet161",
]
# timm models chosen to cover the classes of issue 12 (beside families the other tests cover)
TIMM = [
    "levit_128s",  # attention biases indexed by head, two classifier heads averaged
    "deit_tiny_distilled_patch16_224",  # two classifier heads averaged
    "crossvit_tiny_240",  # two branches, heads' logits averaged
    "swin_tiny_patch4_window7_224",  # relative-position bias tables
    "eva02_tiny_patch14_224",  # rotary tables
    "xcit_nano_12_p16_224",  # per-head temperature, depthwise convs
    "convit_tiny",  # per-head gating parameters
    "cait_xxs24_224",  # talking heads, class attention
    "efficientvit_m0",  # cascaded group attention with attention biases
    "tiny_vit_5m_224",  # attention biases, depthwise convs
    "efficientformerv2_s0",  # attention biases, depthwise convs
    "pit_ti_224",  # grouped (depthwise) pooling convs, position embedding
    "pvt_v2_b0",  # spatial-reduction attention
    "coat_lite_tiny",  # convolutional relative position encoding (per-head depthwise convs)
    "mobilevit_xxs",  # unfolded attention
    "mobilenetv3_small_100",  # depthwise convs, squeeze-excitation
    "efficientnet_b0",
    "convnext_atto",
    "ghostnet_100",  # concatenation then slicing of channels
    "mixnet_s",  # mixed depthwise convs (split, convolve, concatenate)
    "regnetx_002",  # grouped convs
    "regnety_002",
    "resnext26ts",
    "rexnet_100",  # residual added to the first channels only
    "repvit_m1",
    "edgenext_xx_small",
    "poolformer_s12",
    "mixer_s16_224",  # token-mixing MLPs
]
# the subset the vision CI stage always runs: the two models and one model per failure class
# (LeViT: per-head bias tables, head-width attributes, averaged classifier heads; swin_t: head width from the
# input width, fixed with its reason; depthwise and grouped convolutions)
SUBSET = {
    "torchvision": ["swin_t", "inception_v3", "mobilenet_v3_small", "regnet_x_400mf"],
    "timm": ["levit_128s"],
}
# transformers need their native input size; convolutional models run at a small one
_NATIVE = ("swin", "vit", "deit", "levit", "crossvit", "eva", "xcit", "convit", "cait", "pit_", "pvt", "coat",
           "mixer", "efficientformer", "mobilevit")


def _full() -> bool:
    return os.environ.get("MODELPRESS_VISION_SWEEP", "") == "full"


def _cases() -> list[tuple[str, str]]:
    if _full():
        return [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM]
    return [(k, n) for k, names in SUBSET.items() for n in names]


def _load(kind: str, name: str):
    from modelpress.graph.inputs import InputSpec
    from modelpress.models import load

    torch.manual_seed(0)
    graph = load(f"{kind}:{name}")
    size = graph.input_spec.shape[-1]
    if not name.startswith(_NATIVE):
        size = 96
    graph.input_spec = InputSpec("image", list(graph.input_spec.names), shape=(3, size, size))
    return graph


def _spread(size: int, fraction: float) -> list[int]:
    k = min(size - 1, max(1, int(round(size * fraction))))
    return sorted({int(i) for i in np.linspace(0, size - 1, k).round()})


@pytest.mark.parametrize(("kind", "name"), _cases(), ids=lambda v: str(v))
def test_prune_run_export(kind, name, tmp_path):
    pytest.importorskip(kind)
    from modelpress.export import export_onnx

    graph = _load(kind, name)
    x = graph.example_inputs(2, seed=5)
    before = graph.forward(x)
    groups = graph.groups
    for g in groups:
        assert g.prunable or g.reason, g.describe()
    plan = [(g.name, _spread(g.size, FRACTION)) for g in groups if g.prunable]
    params = graph.num_parameters()
    graph.remove_many(plan)
    after = graph.forward(x)
    assert after.shape == before.shape, "a pruned model lost output classes"
    assert torch.isfinite(after).all()
    if plan:
        assert graph.num_parameters() < params
    result = export_onnx(graph.module, graph.input_spec, tmp_path / "m.onnx", optimize="none")
    assert result.verification is not None and result.verification.ok, result.verification.describe()
