"""Super-network search over architecture and quantization policy together (InstaTune, SimQ-NAS, LINAS).

``SearchSpace`` (genes), ``SuperNet`` (saliency-ordered nested weights: masked forward and extraction),
``finetune_supernet`` (sandwich rule, in-place distillation, through the shared training loop), the
``Evaluator`` of candidates (quality, latency, size; precision through the quantize pass by name), the
executors (local, Ray) and the LINAS loop (``run_search``) with its outputs.
"""

from modelpress.search.space import SearchSpace
from modelpress.search.supernet import SuperNet

__all__ = ["SearchSpace", "SuperNet"]
