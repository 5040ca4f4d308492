"""Saliency of the units of a group (higher is kept): the shared criteria of modelpress.data.saliency.

``SALIENCY`` maps the data-free criteria to ``(graph, group) -> scores``; gradient criteria (taylor,
hessian, obd) score every group in one pass with :func:`modelpress.data.saliency.group_saliency`.
"""

from __future__ import annotations

from modelpress.data.saliency import CRITERIA, group_saliency, magnitude

SALIENCY = {"magnitude": magnitude}

__all__ = ["CRITERIA", "SALIENCY", "group_saliency", "magnitude"]
