"""The one entry point for a checkpoint argument: which loader (or saved-folder reader) it names.

Above both ``loaders`` (one function per source kind) and ``saving`` (modelpress's own folders), so that
neither imports the other's caller."""

from __future__ import annotations

import os
from pathlib import Path

from modelpress.errors import ModelpressError
from modelpress.graph import ModelGraph
from modelpress.models.loaders import (
    SPEC_FILE,
    load_default,
    load_factory,
    load_hf,
    load_pickled,
    load_timm,
    load_torchvision,
)
from modelpress.models.saving import load_saved


def load(
    source: str | os.PathLike | None = None, *, trust_pickle: bool = False, input_shape: tuple | None = None,
    seed: int = 0,
) -> ModelGraph:
    """Load a checkpoint as a ModelGraph.

    source: ``hf:DIR`` or a folder with config.json; a folder saved by modelpress; ``timm:NAME[@weights]``;
    ``torchvision:NAME[@weights]``; ``package.module:factory``; a ``.pt``/``.pth`` file (needs
    ``trust_pickle=True``); None for the default model (all-MiniLM-L6-v2 from the ``demo`` extra).
    ``seed``: the random initialization of timm and torchvision models loaded without weights (the run's
    seed), so two loads of the same spec and seed give the same model.
    """
    if source is None:
        return load_default()
    text = str(source)
    if text.startswith("hf:"):
        return load_hf(Path(text[3:]).expanduser())
    if text.startswith("timm:"):
        return load_timm(text[5:], seed=seed)
    if text.startswith("torchvision:"):
        return load_torchvision(text[12:], seed=seed)
    path = Path(text).expanduser()
    if path.suffix in (".pt", ".pth", ".bin") and not path.is_dir():
        return load_pickled(path, trust_pickle=trust_pickle, input_shape=input_shape)
    if path.is_dir():
        if (path / SPEC_FILE).exists():
            return load_saved(path, trust_pickle=trust_pickle)
        return load_hf(path)
    if ":" in text and not path.exists() and "/" not in text.split(":", 1)[0]:
        return load_factory(text, input_shape=input_shape)
    raise ModelpressError(
        f"checkpoint not found: {text}",
        "pass a Hugging Face folder (hf:DIR), timm:NAME, torchvision:NAME, package.module:factory, or a .pt file",
    )


__all__ = ["load"]
