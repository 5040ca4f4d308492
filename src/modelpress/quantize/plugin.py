"""The quantize plugin: importing it registers the quantization passes and the codec that saves and
reloads fake-quant models (see modelpress.plugins)."""

from modelpress.models.saving import register_state_codec
from modelpress.quantize import ort_dynamic, passes  # noqa: F401 - registers quantize.* passes
from modelpress.quantize.fakequant import is_fake_quant
from modelpress.quantize.state import describe, rebuild

register_state_codec("quantization", detect=is_fake_quant, describe=describe, rebuild=rebuild)
