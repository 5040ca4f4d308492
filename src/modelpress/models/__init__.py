"""Checkpoint loaders and save/reload of compressed models."""

from modelpress.models.checkpoints import load
from modelpress.models.loaders import build, load_default, load_hf
from modelpress.models.saving import load_saved, save

__all__ = ["build", "load", "load_default", "load_hf", "load_saved", "save"]
