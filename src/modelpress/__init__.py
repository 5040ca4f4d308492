"""modelpress: make trained neural networks smaller and faster.

Passes (pruning, quantization, search, fusion) run over one model graph; results export to ONNX
and are measured on a target.
"""

from __future__ import annotations

from modelpress.errors import ModelpressError

__version__ = "0.1.0"
__all__ = ["ModelpressError", "load", "__version__"]


def load(source: str | None = None, **kwargs):  # noqa: ANN201 - returns ModelGraph
    """Load a checkpoint (``hf:DIR``, ``timm:NAME``, a saved modelpress directory, ...) as a ModelGraph."""
    from modelpress.models import load as _load

    return _load(source, **kwargs)
