"""The quantize plugin: importing it registers the quantization passes and the codecs that save and
reload fake-quant models and packed weight-only models (see modelpress.plugins)."""

from modelpress.models.saving import register_state_codec
from modelpress.quantize import ort_dynamic, passes, weight_only_pass, weight_only_state  # noqa: F401 - registers quantize.* passes
from modelpress.quantize.fakequant import is_fake_quant
from modelpress.quantize.state import describe, rebuild
from modelpress.quantize.weight_only_pack import is_weight_only

register_state_codec("quantization", detect=is_fake_quant, describe=describe, rebuild=rebuild,
                     encode=weight_only_state.encode_fake_quant, decode=weight_only_state.decode_fake_quant)
register_state_codec("weight_only", detect=is_weight_only, describe=weight_only_state.describe,
                     rebuild=weight_only_state.rebuild)
