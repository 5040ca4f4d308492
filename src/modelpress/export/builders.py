"""Builders of the optimized export candidates: ONNX Runtime's offline optimization, its transformer optimizer
and onnxslim, each from the plain exported file to a new file. Torch-free.

A large model's candidates are built in a child process (``python -m modelpress.export.builders``): the memory a
builder frees stays partly resident in the process that ran it, so in-process every later step of a ``prune`` or
``compress`` stacked its own peak on top of that leftover (5-6x BERT-base's weights); a child returns all of it
when it exits. There the tensors stay on disk: ONNX Runtime writes its optimized graph's tensors to a data file,
and the transformer optimizer fuses the graph with its tensors unloaded, reading the few it rewrites (BERT-base:
its child peaks at 1.3x the file, 7.9x when it loaded the model whole). Small models build in-process: a child
costs about 1.4 s of imports per candidate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from modelpress.errors import ModelpressError

__all__ = ["BUILDERS", "OUT_OF_PROCESS_MIN_BYTES", "build_candidate", "check_onnx"]

BUILDERS = ("ort", "transformer", "onnxslim")
# models whose exported file reaches this size build their candidates in a child process (about 1.4 s of imports
# per candidate): BERT-base pruned to 0.6 of its parameters (259 MB) built in-process peaked at 7x its original
# weights; MiniLM (91 MB) and the test models stay in-process
OUT_OF_PROCESS_MIN_BYTES = 128 * 2**20


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Silence the optimizers' logging and warnings (ORT's fusion statistics, onnxslim's banners)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _build_ort(src: Path, dst: Path, external: bool = False, level: str = "extended",
               disabled: Sequence[str] = ()) -> None:
    """ONNX Runtime's offline graph optimization (extended level by default: portable, no hardware-specific
    layouts); ``disabled``: optimizers left out."""
    import onnxruntime as ort

    from modelpress.targets import get_target

    target = get_target("ort-cpu")
    options = target.session_options(level=level, optimized_path=dst)
    if external:  # ONNX Runtime writes the tensors to the data file itself
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", _data_name(dst))
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if not disabled:
        target.session_with_options(src, options)
        return
    ort.InferenceSession(str(src), options, providers=list(target.providers), disabled_optimizers=list(disabled))


def _data_name(path: Path) -> str:
    """The external data file of the candidate at ``path``: ``<name>.data`` beside it."""
    return path.name + ".data"


def _build_transformer(src: Path, dst: Path, model_type: str, heads: Sequence[int], sizes: Sequence[int],
                       external: bool = False) -> None:
    """ONNX Runtime's transformer optimizer (Attention, SkipLayerNorm, BiasGelu... fusions).

    ``heads`` and ``sizes`` are the head count and head width of every attention module. The optimizer
    takes one head count: with one head width it gets the first layer's (its fusion needs a count
    wherever the export reshapes to [.., -1, head_size]), and after non-uniform head pruning every fused
    Attention node then gets its own count, its Q width over the head width. With several head widths
    it gets none and fuses only where the export states the count.

    ``external`` (a large model): the same optimization with the tensors left on disk (:func:`_fuse_on_disk`).
    """
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    one_size = len(set(sizes)) == 1 and sizes[0] > 0
    num_heads, hidden = (heads[0], heads[0] * sizes[0]) if one_size else (0, 0)
    level = MODEL_TYPES[model_type][2] if model_type in MODEL_TYPES else None
    if external and level in (0, 1):
        _fuse_on_disk(src, dst, model_type, num_heads, hidden, level, sizes[0] if one_size and len(set(heads)) > 1 else 0)
        return
    with _quiet_logs():
        model = optimize_model(
            str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden, use_gpu=False
        )
        if one_size and len(set(heads)) > 1:
            _set_attention_heads(model.model, sizes[0])
        # with external data the tensors go to <dst>.data one by one, never serialized into one protobuf string
        model.save_model_to_file(str(dst), use_external_data_format=external)


def _fuse_on_disk(src: Path, dst: Path, model_type: str, num_heads: int, hidden: int, level: int,
                  head_size: int) -> None:
    """The transformer optimizer at its default ``level`` for ``model_type`` (0: fusions only; 1: ONNX Runtime's
    basic optimization first, as it does), with the graph's tensors left in their data file: the fusions read the
    few they rewrite (the Q, K and V weights they pack) from disk, and the result's tensors are copied into
    ``<dst>.data`` one at a time. Loaded whole, the optimizer peaked at 2.6 GiB (level 0) and 3.2 GiB (level 1) on
    BERT-base's 0.41 GiB; so, 0.5 GiB (measured in a child process each)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    basic = dst.with_name(dst.stem + ".basic.onnx")
    try:
        if level == 1:
            _build_ort(src, basic, external=True, level="basic", disabled=("ConstantSharing",))
        graph = onnx.load(str(basic if level == 1 else src), load_external_data=False)
        with _quiet_logs(), contextlib.chdir(dst.parent):  # tensors' data files are named relative to it
            model = optimize_model(graph, model_type=model_type, num_heads=num_heads, hidden_size=hidden,
                                   use_gpu=False, opt_level=0)
            if head_size:
                _set_attention_heads(model.model, head_size)
            model.topological_sort()
            _save_streamed(model.model, dst)
    finally:
        if basic.exists():
            basic.with_name(_data_name(basic)).unlink(missing_ok=True)
            basic.unlink()


def _save_streamed(model: Any, dst: Path, threshold: int = 1024) -> None:
    """Save ``model`` at ``dst`` with every initializer of ``threshold`` bytes or more, and every tensor already in
    a data file, in ``<dst>.data``, each read from where it is (the protobuf, or a data file named relative to the
    working directory) and written one at a time."""
    import os

    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    data = dst.with_name(_data_name(dst))

    def read_external(tensor: Any) -> bytes:
        info = {e.key: e.value for e in tensor.external_data}
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else os.path.getsize(info["location"]) - offset
        with open(info["location"], "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write(out: Any, tensor: Any, raw: bytes) -> None:
        at = out.tell()
        out.write(raw)
        del tensor.external_data[:]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(at)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    with open(data, "wb") as out:
        for tensor in model.graph.initializer:  # large initializers out of the protobuf
            if not uses_external_data(tensor) and tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
                write(out, tensor, tensor.raw_data)
        for tensor in _get_all_tensors(model):  # and everything still in another data file, into this one
            if uses_external_data(tensor) and {e.key: e.value for e in tensor.external_data}.get("location") != data.name:
                write(out, tensor, read_external(tensor))
    onnx.save_model(model, str(dst))


def _set_attention_heads(model: Any, head_size: int) -> None:
    """Give every fused Attention node the head count its packed QKV weight holds (Q width / head width)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if "num_heads" not in attrs:
            continue
        if node.op_type != "Attention" or len(node.input) < 2 or node.input[1] not in initializers:
            raise ModelpressError(
                f"cannot read the head count of the fused {node.op_type} node {node.name!r}",
                "the layers have different head counts; use optimize='ort' or 'none'",
            )
        if "qkv_hidden_sizes" in attrs:
            q_width = int(attrs["qkv_hidden_sizes"].ints[0])
        else:
            q_width = int(numpy_helper.to_array(initializers[node.input[1]]).shape[-1]) // 3
        if q_width % head_size:
            raise ModelpressError(f"fused {node.name!r}: Q width {q_width} is not a multiple of head size {head_size}")
        attrs["num_heads"].i = q_width // head_size


def _build_onnxslim(src: Path, dst: Path, external: bool = False) -> None:
    import onnx
    import onnxslim

    with _quiet_logs():
        model = onnxslim.slim(str(src))
    if external:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=_data_name(dst),
                  size_threshold=1024)
    else:
        onnx.save(model, str(dst))


def check_onnx(path: Path | str) -> None:
    """``onnx.checker`` on the file at ``path`` (it parses the whole model: about twice the file's bytes at its
    peak), as a ModelpressError."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError and friends
        raise ModelpressError(f"the exported ONNX model fails onnx.checker: {exc}") from exc


def _build_here(name: str, src: Path, dst: Path, options: dict[str, Any]) -> None:
    """Build and check candidate ``name`` (ORT's "extended" level writes its own ops, e.g.
    SimplifiedLayerNormalization on Llama, into the ONNX domain, where onnx.checker refuses them: such a file
    is no candidate)."""
    data = dst.with_name(_data_name(dst))
    if data.exists():  # a data file left by an earlier build: the writers append to it
        data.unlink()
    _build_one(name, src, dst, options)
    check_onnx(dst)


def _build_one(name: str, src: Path, dst: Path, options: dict[str, Any]) -> None:
    """With ``external_data`` the candidate's tensors go to ``<dst>.data``: ONNX Runtime then reads them straight
    into its buffers instead of parsing them out of the protobuf first (a session of BERT-base's 435 MB model
    peaked 514 MiB above the process inline, 343 MiB with external data; measured), and no builder serializes
    the whole model into one protobuf string."""
    external = bool(options.get("external_data"))
    if name == "ort":
        _build_ort(src, dst, external)
    elif name == "transformer":
        _build_transformer(src, dst, options.get("model_type") or "bert", options.get("heads", ()),
                           options.get("sizes", ()), external)
    elif name == "onnxslim":
        _build_onnxslim(src, dst, external)
    else:
        raise ModelpressError(f"unknown export candidate {name!r}", f"use one of: {', '.join(BUILDERS)}")


def build_candidate(name: str, src: Path | str, dst: Path | str, *, isolated: bool | None = None,
                    **options: Any) -> int | None:
    """Build candidate ``name`` (one of :data:`BUILDERS`) from the plain export ``src`` into ``dst``, and check it
    with onnx.checker (in the child too: the check parses the whole file).

    ``options``: ``model_type``, ``heads`` and ``sizes`` for the transformer optimizer. ``isolated``: build
    in a child process (None: when ``src`` is at least :data:`OUT_OF_PROCESS_MIN_BYTES` with its external
    data). Returns the child's peak resident set in bytes, or None when built in this process. A failed child
    raises ModelpressError with the last line it printed.
    """
    from modelpress.export.files import onnx_file_size

    src, dst = Path(src), Path(dst)
    if isolated is None:
        isolated = onnx_file_size(src) >= OUT_OF_PROCESS_MIN_BYTES
    if not isolated:
        _build_here(name, src, dst, options)
        return None
    # a large model's candidate keeps its tensors in external data, as the streamed export writes the plain one
    request = json.dumps({"name": name, "src": str(src), "dst": str(dst), "options": {**options, "external_data": True}})
    done = subprocess.run([sys.executable, "-m", "modelpress.export.builders", request],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}"
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} (out of memory?)"
        raise ModelpressError(f"building the {name!r} candidate failed in its own process: {why}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _own_peak() -> int:
    """This process's peak resident set: ``VmHWM`` (ru_maxrss survives exec on Linux, so a child started from a
    large parent would report the parent's size at the fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry: build one candidate from a JSON request, print the child's peak resident set as JSON."""
    from modelpress.system import apply_malloc_setting

    apply_malloc_setting()  # the optimizers' freed copies leave the resident set, not stacked under later peaks
    request = json.loads((sys.argv[1:] if argv is None else list(argv))[0])
    try:
        _build_here(request["name"], Path(request["src"]), Path(request["dst"]), request.get("options", {}))
    except Exception as exc:  # the parent reports it as the candidate's failure
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"peak_rss_bytes": _own_peak()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
