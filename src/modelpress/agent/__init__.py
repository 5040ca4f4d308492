"""The measurement agent: a small server a user starts on a device (``modelpress agent`` or
``python -m modelpress.agent``) that times uploaded ONNX models there with the same interleaved protocol as
the local bench, and returns latency statistics, peak memory and output digests.

It imports only the standard library, numpy, onnxruntime, its server library (starlette with uvicorn, the
``agent`` extra) and modelpress pieces that do not import torch (errors, system, targets, timing): a device
has no torch, and a test checks that importing this package loads none. The server itself is imported only
when it is started, so ``import modelpress.agent`` works without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AgentSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from modelpress.agent import server

        return getattr(server, name)
    raise AttributeError(name)
