"""Save a (compressed) ModelGraph as safetensors + a structure spec, and rebuild it without pickle."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modelpress.errors import ModelpressError
from modelpress.graph import InputSpec, ModelGraph
from modelpress.graph.edit import apply_edit, set_tensor, sync_module_attrs
from modelpress.graph.mapped import whole_storage
from modelpress.models.loaders import SPEC_FILE, build

_SPEC_KEYS = {"format_version", "name", "source", "edits", "input_spec", "aliases", "lineage", "encoded_shapes"}

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class StateCodec:
    """How a method saves module state that the float architecture does not have (fake-quant wrappers,
    their quantizers and reparameterization buffers): ``detect(module)`` says whether the module carries
    it, ``describe(module)`` returns JSON, ``rebuild(module, description)`` puts it back on a fresh
    float module before the weights are loaded. Methods register theirs from their plugin module.

    Optional ``encode(module, state) -> state`` rewrites the tensors written (e.g. quantized weights as packed
    integer codes) and ``decode(module, weights) -> weights`` turns them back into the module's state after
    ``rebuild``."""

    name: str
    detect: Callable[[torch.nn.Module], bool]
    describe: Callable[[torch.nn.Module], Any]
    rebuild: Callable[[torch.nn.Module, Any], None]
    encode: Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    decode: Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


STATE_CODECS: dict[str, StateCodec] = {}


def register_state_codec(
    name: str,
    *,
    detect: Callable[[torch.nn.Module], bool],
    describe: Callable[[torch.nn.Module], Any],
    rebuild: Callable[[torch.nn.Module, Any], None],
    encode: Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    decode: Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Make saved models carry (and reload) the state ``name`` (a key of modelpress.json)."""
    if name in _SPEC_KEYS:
        raise ValueError(f"{name!r} is a reserved key of {SPEC_FILE}")
    STATE_CODECS[name] = StateCodec(name, detect, describe, rebuild, encode, decode)


def _codecs() -> dict[str, StateCodec]:
    from modelpress.plugins import load_plugins

    load_plugins()
    return STATE_CODECS


@contextlib.contextmanager
def staged_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out``, moved to ``out`` when the block completes and removed when it
    fails: a run never leaves a half-written output folder (saved models and CLI output folders alike).

    The finished folder gets the modes of anything the user writes (the umask), not the temporary folder's
    private 0700/0600. Without ``overwrite`` an ``out`` that appeared while the block ran (another run's
    result) is never touched: this run's folder is kept beside it and a ModelpressError says where. With
    ``overwrite`` the old folder is moved aside, the new one moved in, and only then the old one deleted, so
    a crash at any point leaves one complete folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        _commit(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out`` (see ``staged_dir``)."""
    old = None
    if overwrite and out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)  # a rename within one folder: atomic
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".kept", dir=out.parent))
        kept.rmdir()
        os.rename(tmp, kept)
        _follow_umask(kept)
        raise ModelpressError(
            f"output {out} appeared while this run worked (another run?); this run's result was kept in {kept}",
            "move it where you want it, or pass --overwrite to replace the output",
        ) from None
    finally:
        if old is not None:
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the new folder never made it: put the old one back
                os.rename(old / out.name, out)
                old.rmdir()


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError when ``dst`` exists, atomically where the OS can
    (Linux renameat2 RENAME_NOREPLACE; a plain rename would silently replace an empty folder)."""
    libc = _libc()
    if libc is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # anything but "not supported here"
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@functools.cache
def _libc() -> Any:
    """The C library when it has renameat2 (glibc >= 2.28), else None."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return libc
    except (OSError, AttributeError):
        return None


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain mkdir/open would have: folders (and executable
    files) 0o777 & ~umask, other files 0o666 & ~umask."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            path = os.path.join(folder, d)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def save(graph: ModelGraph, directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write model.safetensors + modelpress.json (+ tokenizer and config) into ``directory``.

    The folder is written under a temporary name and renamed when complete (see ``staged_dir``; an existing
    ``directory`` is replaced unless ``overwrite=False``).
    """
    target = Path(directory)
    with staged_dir(target, overwrite=overwrite) as tmp:
        write_into(graph, tmp)
    return target


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is the whole of a contiguous storage (safetensors writes it from its memory, no
    copy: a second copy of the model at save time is what a 1B model cannot afford); else a contiguous copy
    (a view into a larger storage, which safetensors refuses as shared memory)."""
    return t if whole_storage(t) else t.clone(memory_format=torch.contiguous_format)


def write_into(graph: ModelGraph, folder: Path) -> None:
    """Write the model files into an existing folder (no atomicity; see ``save``)."""
    state = {}
    seen: dict[int, str] = {}
    for name, t in graph.module.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:  # tied weights: store once, note the alias
            continue
        seen[key] = name
        state[name] = _own_storage(t.detach())
    aliases = {
        name: seen[t.data_ptr()]
        for name, t in graph.module.state_dict().items()
        if name not in state and t.data_ptr() in seen
    }
    targets = set(aliases.values())
    floats = {k: list(v.shape) for k, v in state.items()}
    for codec in _codecs().values():
        if codec.encode is not None and codec.detect(graph.module):
            # an alias target stays as it is: its aliases load the same tensor
            kept = {k: v for k, v in state.items() if k in targets}
            state = {**codec.encode(graph.module, {k: v for k, v in state.items() if k not in targets}), **kept}
    save_file(state, str(folder / WEIGHTS_FILE))
    # the shapes of the tensors a codec wrote in another form (an INT8 weight as its codes): a narrowed
    # layer's float weight takes that shape on reload before the config is synced and the codes decoded
    encoded = {k: s for k, s in floats.items() if k not in state}
    spec = {
        "format_version": FORMAT_VERSION,
        "name": graph.name,
        "source": graph.source,
        "edits": graph.edits,
        "lineage": graph.lineage_record(),
        "input_spec": graph.input_spec.to_dict(),
        "aliases": aliases,
        "encoded_shapes": encoded,
    }
    for name, codec in _codecs().items():
        spec[name] = codec.describe(graph.module) if codec.detect(graph.module) else None
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2, default=str))
    config = getattr(graph.module, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(folder / "config.json"))
    if graph.tokenizer is not None and hasattr(graph.tokenizer, "save_pretrained"):
        graph.tokenizer.save_pretrained(str(folder))


def load_saved(folder: str | os.PathLike, *, trust_pickle: bool = False) -> ModelGraph:
    """Rebuild a model saved by ``save``: original architecture, replayed edits, then the weights."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / SPEC_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelpressError(f"cannot read {folder / SPEC_FILE}: {exc}", "the saved model is incomplete") from exc
    if spec.get("format_version") != FORMAT_VERSION:
        raise ModelpressError(f"{folder} was saved by an incompatible modelpress", "re-save it with this version")
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:
        raise ModelpressError(
            f"weight file {folder / WEIGHTS_FILE} is missing, corrupted or truncated", "re-save the model"
        ) from exc
    module = build(spec["source"], trust_pickle=trust_pickle)
    for e in spec["edits"]:
        apply_edit(module, e)
    shapes = {k: tuple(s) for k, s in (spec.get("encoded_shapes") or {}).items()}
    _fit_shapes(module, weights, shapes)
    if spec["edits"]:
        # the config follows the edited widths; analysed on the float model (a fake-quant graph is far
        # larger to trace and gives the same widths)
        ModelGraph(module.eval(), InputSpec.from_dict(spec["input_spec"]), spec["source"],
                   edits=spec["edits"])._sync_config()
    unknown = [k for k, v in spec.items() if k not in _SPEC_KEYS and v and k not in _codecs()]
    if unknown:
        raise ModelpressError(f"{folder} carries state {unknown} that no installed plugin can rebuild",
                              "install the modelpress version (or plugin) that saved it")
    for name, codec in _codecs().items():
        if spec.get(name):
            codec.rebuild(module, spec[name])
            _fit_shapes(module, weights, shapes)  # the rebuilt wrappers' tensors, before their codes decode
            if codec.decode is not None:
                weights = codec.decode(module, weights)
            _fit_shapes(module, weights)
    for alias, name in spec.get("aliases", {}).items():
        weights[alias] = weights[name]
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [m for m in missing if m not in spec.get("aliases", {})]
    if missing or unexpected:
        raise ModelpressError(
            f"saved weights do not fit the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "the folder may come from another modelpress version",
        )
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        try:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except Exception:
            tokenizer = None
    graph = ModelGraph(
        module.eval(),
        InputSpec.from_dict(spec["input_spec"]),
        spec["source"],
        tokenizer=tokenizer,
        edits=spec["edits"],
        name=spec.get("name", folder.name),
        lineage_known="lineage" in spec,  # older files: unit removals left no trace
    )
    _check_lineage(graph, spec, folder)
    return graph


def _check_lineage(graph: ModelGraph, spec: dict, folder: Path) -> None:
    """The lineage replayed from the edit log must be the one written beside it."""
    if "lineage" in spec and graph.lineage_record() != spec["lineage"]:
        raise ModelpressError(
            f"{folder / SPEC_FILE}: the edit log does not reproduce the recorded unit lineage",
            "the spec was edited by hand or is corrupted; re-save the model",
        )


def _fit_shapes(module: torch.nn.Module, weights: dict[str, torch.Tensor],
                encoded: dict[str, tuple[int, ...]] | None = None) -> None:
    """Give tensors whose saved shape differs (replayed edits, per-tensor vs per-channel scales) that shape;
    ``encoded``: the float shapes of tensors saved in another form (``encoded_shapes`` of the spec)."""
    current = dict(module.state_dict())
    wanted = {**{k: (tuple(s), None) for k, s in (encoded or {}).items() if k not in weights},
              **{k: (tuple(t.shape), t.dtype) for k, t in weights.items()}}
    with torch.no_grad():
        for name, (shape, dtype) in wanted.items():
            if name in current and tuple(current[name].shape) != shape:
                set_tensor(module, name, torch.empty(shape, dtype=dtype or current[name].dtype))
    sync_module_attrs(module)
