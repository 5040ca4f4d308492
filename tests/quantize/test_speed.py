"""The default never hands back a slower model (issue 19, item 5): the decision, on measurements given
through the Target (its per-node profile) and a measured bench report, without timing anything."""

from __future__ import annotations

from modelpress.quantize.speed import block_times, blocks_that_lose, keep_faster, module_path
from modelpress.targets import Target


class ProfiledTarget(Target):
    """A target whose per-node profile is given, not measured."""

    def __init__(self, times: dict[str, dict[str, float]]) -> None:
        super().__init__(name="given")
        object.__setattr__(self, "times", times)

    def node_times(self, path, feeds, runs=10):  # noqa: ANN001, ANN201, ARG002
        return self.times[str(path)]


def bench(*speedups: float) -> dict:
    return {"variants": {"int8": {"shapes": [{"batch": b, "speedup": s} for b, s in zip((1, 8), speedups, strict=False)]}}}


BLOCKS = ["layer1.0", "layer1.1", "layer2.0"]
LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv1", "fc"]
INT8 = {"/module/conv1/Conv_token_1": 2.0, "/module/layer1/layer1.0/conv1/Conv_token_5": 1.0,
        "/module/layer1/layer1.0/Add": 0.2, "/module/layer1/layer1.1/conv2/Conv_token_8": 3.0,
        "/module/layer2/layer2.0/conv1/Conv_token_9": 0.5, "/module/fc/Gemm_quant": 0.1}
FP32 = {"/module/relu/Relu_output_0_nchwc": 4.0, "/module/layer1/layer1.0/relu/Relu_output_0_nchwc": 2.0,
        "/module/layer1/layer1.1/conv2/Conv_output_0_nchwc": 1.0, "/module/layer2/layer2.0/relu/Relu_output_0": 1.0,
        "/module/fc/Gemm": 0.1}


def run(measurements: list[dict], target: Target) -> tuple[dict, list]:
    calls: list = []
    seq = iter(measurements)
    decision = keep_faster(
        measure=lambda: next(seq),
        profile=lambda: (target.node_times("int8.onnx", {}), target.node_times("float.onnx", {})),
        layers_in=lambda bs: [n for n in LAYERS if any(n.startswith(b + ".") for b in bs if b)
                              or ("" in bs and not any(n.startswith(b + ".") for b in BLOCKS))],
        keep_float=lambda layers: calls.append(("float", list(layers))),
        reexport=lambda: calls.append(("reexport",)),
        give_up=lambda: calls.append(("give_up",)),
        blocks=BLOCKS,
        log=lambda _msg: None,
    )
    return decision, calls


def test_scopes_map_nodes_to_modules_and_blocks():
    assert module_path("/module/layer2/layer2.0/downsample/downsample.0/Conv_token_19") == "layer2.0.downsample.0"
    assert module_path("pixel_values_QuantizeLinear") == ""
    times = block_times(INT8, BLOCKS)
    assert times == {"": 2.1, "layer1.0": 1.2, "layer1.1": 3.0, "layer2.0": 0.5}


def test_faster_everywhere_keeps_int8_untouched():
    decision, calls = run([bench(1.8, 2.1)], ProfiledTarget({"int8.onnx": INT8, "float.onnx": FP32}))
    assert decision["decision"] == "int8" and calls == []


def test_the_blocks_that_lose_go_float_and_the_rest_stays_int8():
    assert blocks_that_lose(block_times(INT8, BLOCKS), block_times(FP32, BLOCKS)) == ["layer1.1"]
    target = ProfiledTarget({"int8.onnx": INT8, "float.onnx": FP32})
    decision, calls = run([bench(0.9, 1.3), bench(1.1, 1.4)], target)
    assert calls == [("float", ["layer1.1.conv1", "layer1.1.conv2"]), ("reexport",)]
    assert decision["decision"] == "int8 (partly float)" and decision["blocks_kept_float"] == ["layer1.1"]
    assert decision["speedups"] == {"batch 1": 1.1, "batch 8": 1.4}


def test_still_slower_hands_back_the_float_model_with_the_reason():
    target = ProfiledTarget({"int8.onnx": INT8, "float.onnx": FP32})
    decision, calls = run([bench(0.7, 1.2), bench(0.8, 1.1)], target)
    assert calls[-1] == ("give_up",) and decision["decision"] == "float"
    assert "slower than float" in decision["reason"] and "batch 1" in decision["reason"]


def test_when_every_layer_loses_it_goes_straight_to_float():
    slow = {k: v * 10 for k, v in INT8.items()}
    target = ProfiledTarget({"int8.onnx": slow, "float.onnx": {k: 1.0 for k in FP32}})
    decision, calls = run([bench(0.5, 0.6)], target)
    assert calls == [("give_up",)] and decision["decision"] == "float"


def test_units_are_container_items_for_any_family():
    from modelpress.quantize.speed import layer_units

    layers = ["features.0.0", "features.3.block.0.0", "features.3.block.2.fc1", "classifier.0", "conv1",
              "layer2.0.downsample.0", "encoder.layer.11.attention.self.query"]
    assert layer_units(layers) == ["classifier.0", "encoder.layer.11", "features.0", "features.3", "layer2.0"]
