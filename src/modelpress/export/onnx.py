"""ONNX export: torch.onnx export, graph-optimization candidates chosen by measurement, verification.

``export_onnx`` exports once with ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter, which
exports MiniLM correctly; see the field notes), builds optimized candidates from that file, verifies
each against torch, times them interleaved on the target and keeps the fastest one that verifies.

Hugging Face models are exported with ``attn_implementation="eager"`` by default (temporarily switched,
restored after): with transformers 5 the "sdpa" path traces to a graph with a per-layer NaN guard on
the softmax (IsNaN + Where) and a decomposed scaled-dot-product, which ran slower in ONNX Runtime and
which ONNX Runtime's transformer optimizer cannot fuse into its Attention kernel.
"""

from __future__ import annotations

import contextlib
import gc
import io
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export.builders import OUT_OF_PROCESS_MIN_BYTES, build_candidate, check_onnx
from modelpress.export.files import move_onnx, onnx_file_size
from modelpress.export.streamed import STREAM_MIN_BYTES, export_streamed, weight_bytes
from modelpress.export.verify import DEFAULT_RTOL, Verification, compare_onnx, torch_reference
from modelpress.graph import adapters
from modelpress.graph.inputs import InputSpec
from modelpress.graph.mapped import drop_mapped_weights
from modelpress.graph.run import PrimaryOutput, eval_mode
from modelpress.progress import QUIET, Reporter
from modelpress.system import available_memory, release_freed_memory


class CandidateTimer(Protocol):
    """Times verified export candidates on a target (``modelpress.bench.candidate_timer`` makes one).

    Export sits below bench, so it never imports the latency runner: callers that want "auto" to pick
    the fastest candidate pass a timer. Returns per candidate (median ms, speedup vs ``baseline``)
    and a description of the timing (target, shape, rounds).
    """

    def __call__(
        self, candidates: dict[str, Path], input_spec: InputSpec, baseline: str
    ) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]: ...

OPTIMIZATIONS = ("none", "ort", "transformer", "onnxslim")
# the peak memory of building each candidate over the exported file's bytes (measured on BERT-base, 438 MB, in the
# builder's child process: ONNX Runtime's offline optimization 1.1x; its transformer optimizer 7.9x loaded whole,
# as a small model builds in-process, and 1.3x with the tensors left on disk, as a large model's child builds it;
# onnxslim 8.3x), with a margin: a candidate that would not fit in the memory available is skipped (auto) or
# refused (forced), not left to the kernel's out-of-memory killer
BUILD_MEMORY = {"ort": 1.5, "transformer": 10.0, "onnxslim": 9.0}
ON_DISK_BUILD_MEMORY = {"transformer": 2.0}  # exports of OUT_OF_PROCESS_MIN_BYTES and more

# --------------------------------------------------------------------------------------------- results


@dataclass
class Candidate:
    """One optimization candidate built during export."""

    name: str
    verified: bool | None = None  # None: not verified
    median_ms: float | None = None  # median of per-round medians at the timing shape
    speedup: float | None = None  # vs "none", median of per-round ratios
    file_size_bytes: int | None = None
    build_seconds: float | None = None
    verification: Verification | None = None
    error: str | None = None
    build_process_peak_bytes: int | None = None  # peak resident set of the child process that built it, if any


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and why."""

    path: Path
    optimization: str
    candidates: dict[str, Candidate]
    verification: Verification | None
    file_size_bytes: int
    export_seconds: float
    opset: int = 17
    attn_implementation: str | None = None
    model_type: str | None = None
    timing: dict[str, Any] | None = None  # target, shape and rounds of the candidate timing (auto)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------------------------------ helpers


def _hf_models(module: nn.Module) -> list[nn.Module]:
    """Hugging Face PreTrainedModels inside ``module`` (itself included) that can switch attention."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    return [
        m
        for m in module.modules()
        if isinstance(m, PreTrainedModel) and hasattr(m, "set_attn_implementation")
    ]


@contextlib.contextmanager
def attention_implementation(module: nn.Module, implementation: str | None) -> Iterator[str | None]:
    """Temporarily switch every HF model inside ``module`` to ``implementation``; yields what is in use."""
    models = _hf_models(module)
    if not models:
        yield None
        return
    originals = [getattr(m.config, "_attn_implementation", None) for m in models]
    if implementation is None or all(o == implementation for o in originals):
        yield originals[0]
        return
    switched: list[tuple[nn.Module, str | None]] = []

    def restore() -> None:
        while switched:
            m, original = switched.pop()
            with contextlib.suppress(Exception):
                m.set_attn_implementation(original)

    try:
        try:
            for m, original in zip(models, originals, strict=True):
                m.set_attn_implementation(implementation)
                switched.append((m, original))
            in_use = getattr(models[0].config, "_attn_implementation", implementation)
        except Exception:  # the model cannot switch: export it as it is
            restore()
            in_use = originals[0]
        yield in_use
    finally:
        restore()


def infer_model_type(module: nn.Module) -> str | None:
    """The ONNX Runtime transformer-optimizer model type for ``module`` (``graph.adapters.ort_model_type``)."""
    return adapters.ort_model_type(module)


def default_batches(input_spec: InputSpec) -> list[dict[str, np.ndarray]]:
    """Sample inputs for verification: batch 2; for text two sequence lengths, one sample padded."""
    if input_spec.kind == "text":
        a = input_spec.make(2, input_spec.fit_seq_len(16), seed=1)
        b = input_spec.make(2, input_spec.fit_seq_len(37), seed=2)
        if "attention_mask" in b:
            b["attention_mask"][1, -9:] = 0
        return [a, b]
    return [input_spec.make(2, seed=1), input_spec.make(2, seed=2)]


def verify_onnx(
    path: Path | str,
    module: nn.Module,
    input_spec: InputSpec,
    *,
    batches: Sequence[dict[str, np.ndarray]] | None = None,
    atol: float = 1e-3,
    min_cosine: float = 0.9999,
    rtol: float = DEFAULT_RTOL,
) -> Verification:
    """Run the ONNX model in ONNX Runtime and ``module`` in torch on the same inputs and compare.

    ``batches`` are input dicts (numpy, keyed by input name); by default batch 2 at two sequence lengths
    for text (one sample padded) or two random batches of 2 otherwise. The error allowed is
    ``atol + rtol * max|torch output|`` (``rtol`` for large-valued outputs; see ``export.verify``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelpressError(f"no ONNX file at {path}")
    batches = list(batches) if batches is not None else default_batches(input_spec)
    reference = torch_reference(module, input_spec.names, batches)
    return compare_onnx(path, batches, reference, atol=atol, min_cosine=min_cosine, rtol=rtol)


def _output_axes(wrapped: nn.Module, input_spec: InputSpec) -> dict[int, str]:
    """Which output axes follow the batch (and sequence) size, found by running two input shapes."""
    with torch.inference_mode():
        if input_spec.kind == "text":
            a = wrapped(*input_spec.make_torch(2, 16).values())
            b = wrapped(*input_spec.make_torch(3, 19).values())
        else:
            a = wrapped(*input_spec.make_torch(2).values())
            b = wrapped(*input_spec.make_torch(3).values())
    axes: dict[int, str] = {}
    if a.dim() != b.dim():
        return {0: "batch"}
    for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)):
        if x == 2 and y == 3:
            axes[i] = "batch"
        elif x == 16 and y == 19:
            axes[i] = "sequence"
        elif x != y:
            axes[i] = f"dim{i}"
    axes.setdefault(0, "batch")
    return axes


def _torch_export(module: nn.Module, input_spec: InputSpec, path: Path, opset: int) -> None:
    wrapped = PrimaryOutput(module, input_spec.names)
    with eval_mode(module):
        out_axes = _output_axes(wrapped, input_spec)
        sample = input_spec.make_torch(2, 16) if input_spec.kind == "text" else input_spec.make_torch(2)
        args = tuple(sample[n] for n in input_spec.names)
        kwargs = {"output_names": ["output"], "dynamic_axes": {**input_spec.dynamic_axes(), "output": out_axes},
                  "opset_version": opset, "do_constant_folding": True, "dynamo": False}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if weight_bytes(module) >= STREAM_MIN_BYTES:  # the exporter's own copies would triple the weights
                export_streamed(wrapped, args, path, input_names=list(input_spec.names), **kwargs)
            else:
                torch.onnx.export(wrapped, args, str(path), input_names=list(input_spec.names), **kwargs)


def onnxslim_available() -> bool:
    try:
        import onnxslim  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- export


def export_onnx(
    module: nn.Module,
    input_spec: InputSpec,
    path: Path | str,
    *,
    opset: int = 17,
    optimize: str = "auto",
    verify: bool = True,
    timer: CandidateTimer | None = None,
    reporter: Reporter = QUIET,
    model_type: str | None = None,
    atol: float = 1e-3,
    min_cosine: float = 0.9999,
    attn_implementation: str | None = "eager",
    rtol: float = DEFAULT_RTOL,
) -> ExportResult:
    """Export ``module`` to ONNX at ``path`` with dynamic batch (and sequence, for text) axes.

    ``optimize``: "auto" builds every applicable candidate ("none", "ort", "transformer" for known
    transformer models, "onnxslim" when installed), verifies each against torch, times them with
    ``timer`` (``modelpress.bench.candidate_timer(target)``) and keeps the fastest that verifies (without
    a timer, the plain export); a name forces that candidate. ``verify`` (forced mode) checks the result
    against torch and raises ModelpressError past ``atol`` (plus ``rtol`` times the largest torch output,
    for large-valued outputs) / ``min_cosine`` (auto always verifies).
    ``attn_implementation`` switches HF models' attention for the export (None keeps the model's).
    The file appears at ``path`` only when everything succeeded.
    """
    started = time.perf_counter()
    path = Path(path)
    if optimize != "auto" and optimize not in OPTIMIZATIONS:
        raise ModelpressError(
            f"unknown optimization {optimize!r}", f"use 'auto' or one of: {', '.join(OPTIMIZATIONS)}"
        )
    if optimize == "onnxslim" and not onnxslim_available():
        raise ModelpressError("optimization 'onnxslim' needs the onnxslim package", "pip install onnxslim")
    model_type = model_type or adapters.ort_model_type(module)
    if optimize == "transformer" and not model_type:
        raise ModelpressError(
            "optimization 'transformer' needs a model type: none is known to fuse this model family correctly",
            "pass model_type='bert' (or 'vit', 'gpt2', ...) if the model is one of those, or use optimize='ort'",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.export-"))
    try:
        plain = workdir / "none.onnx"
        with (
            reporter.step(f"exporting to ONNX (opset {opset})"),
            attention_implementation(module, attn_implementation) as attn,
        ):
            try:
                _torch_export(module, input_spec, plain, opset)
            except ModelpressError:
                raise
            except Exception as exc:
                raise ModelpressError(
                    f"torch.onnx.export failed: {type(exc).__name__}: {exc}",
                    "check that the model runs on the input spec's sample inputs",
                ) from exc
        check_onnx(plain)
        reference = batches = None
        if optimize == "auto" or verify:
            batches = default_batches(input_spec)
            reference = torch_reference(module, input_spec.names, batches)
        # torch is done with the weights: those mapped from the checkpoint leave the resident set before the
        # candidates' builders and sessions (they read back from the file if the module runs again)
        drop_mapped_weights(module)

        names = [n for n in OPTIMIZATIONS if _applicable(n, model_type, plain)] if optimize == "auto" else [optimize]
        candidates: dict[str, Candidate] = {}
        paths: dict[str, Path] = {}
        options = {"model_type": model_type or "bert", "heads": adapters.attention_heads(module),
                   "sizes": adapters.head_sizes(module)}
        for name in names:
            t0 = time.perf_counter()
            dst = workdir / f"{name}.onnx"
            try:
                child_peak = None
                if name != "none":
                    _check_memory(name, plain)
                    with reporter.step(f"building candidate {name!r}"):
                        child_peak = build_candidate(name, plain, dst, **options)
                    if child_peak is None:
                        # ORT's transformer optimizer leaves model copies in reference cycles (2.2 GB on BERT-base,
                        # measured): freed before the next candidate, not stacked under its peak
                        gc.collect()
                        release_freed_memory()
                paths[name] = plain if name == "none" else dst
                candidates[name] = Candidate(
                    name, build_seconds=time.perf_counter() - t0, file_size_bytes=onnx_file_size(paths[name]),
                    build_process_peak_bytes=child_peak,
                )
            except Exception as exc:
                if optimize != "auto" and isinstance(exc, ModelpressError):
                    raise
                if optimize != "auto":
                    raise ModelpressError(
                        f"optimization {name!r} failed: {type(exc).__name__}: {exc}"
                    ) from exc
                candidates[name] = Candidate(name, verified=False, error=f"{type(exc).__name__}: {exc}")
                reporter.log(f"candidate {name!r} failed: {exc}")

        if reference is not None:
            for name, cand_path in paths.items():
                try:
                    v = compare_onnx(cand_path, batches, reference, atol=atol, min_cosine=min_cosine, rtol=rtol)
                except Exception as exc:
                    v = Verification(float("inf"), -1.0, False, atol, min_cosine, rtol=rtol)
                    candidates[name].error = f"ONNX Runtime failed: {type(exc).__name__}: {exc}"
                candidates[name].verification, candidates[name].verified = v, v.ok

        timing = None
        if optimize == "auto":
            good = {n: p for n, p in paths.items() if candidates[n].verified}
            if not good:
                v = candidates["none"].verification
                raise ModelpressError(
                    f"the ONNX export does not match torch: {v.describe() if v else 'verification failed'}",
                    "loosen atol/min_cosine for quantized models, or try attn_implementation=None",
                )
            chosen, timing = _choose(good, candidates, input_spec, timer, reporter)
        else:
            chosen = optimize
            v = candidates[chosen].verification
            if verify and v is not None and not v.ok:
                raise ModelpressError(
                    f"the ONNX export ({chosen}) does not match torch: {v.describe()}",
                    "loosen atol/min_cosine for quantized models, or try optimize='none'",
                )
        move_onnx(paths[chosen], path)
        reporter.log(f"wrote {path} (optimization: {chosen})")
        return ExportResult(
            path=path,
            optimization=chosen,
            candidates=candidates,
            verification=candidates[chosen].verification,
            file_size_bytes=onnx_file_size(path),
            export_seconds=time.perf_counter() - started,
            opset=opset,
            attn_implementation=attn,
            model_type=model_type,
            timing=timing,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _check_memory(name: str, plain: Path) -> None:
    """Refuse to build candidate ``name`` when its builder's usual peak exceeds the memory available."""
    size = onnx_file_size(plain)
    factor = (ON_DISK_BUILD_MEMORY if size >= OUT_OF_PROCESS_MIN_BYTES else BUILD_MEMORY).get(
        name, BUILD_MEMORY.get(name, 0.0))
    need = factor * size
    free = available_memory()
    if free is not None and need > free:
        raise ModelpressError(
            f"building the {name!r} candidate needs about {need / 2**30:.1f} GiB ({factor}x the "
            f"{onnx_file_size(plain) / 2**30:.2f} GiB model), {free / 2**30:.1f} GiB is available",
            "use optimize='none' (ONNX Runtime optimizes at session creation) or free memory")


def _applicable(name: str, model_type: str | None, plain: Path | None = None) -> bool:
    """Whether ``auto`` builds candidate ``name``. onnxslim loads the whole model and peaks at 8.3x it (BERT-base),
    so a large export (:data:`~modelpress.export.builders.OUT_OF_PROCESS_MIN_BYTES`) leaves it out of ``auto``
    (asked for by name, it is built); ONNX Runtime's candidates build with the tensors on disk."""
    if name == "transformer":
        return model_type is not None
    if name == "onnxslim":
        return onnxslim_available() and (plain is None or onnx_file_size(plain) < OUT_OF_PROCESS_MIN_BYTES)
    return True


def _choose(
    good: dict[str, Path],
    candidates: dict[str, Candidate],
    input_spec: InputSpec,
    timer: CandidateTimer | None,
    reporter: Reporter,
) -> tuple[str, dict[str, Any]]:
    """Time the verified candidates; the fastest by median per-round speedup over "none" wins."""
    baseline = "none" if "none" in good else next(iter(good))
    if len(good) == 1:
        return baseline, {"skipped": "one candidate"}
    if timer is None:
        return baseline, {"skipped": "no timer given: the plain export is kept (pass timer=bench.candidate_timer(target))"}
    with reporter.step(f"timing {len(good)} export candidates"):
        stats, timing = timer(good, input_spec, baseline)
    for name in good:
        candidates[name].median_ms, candidates[name].speedup = stats[name]
    # Prefer the plain export unless a candidate is measurably faster (ties go to fewer rewrites).
    best = baseline
    for name in good:
        if (candidates[name].speedup or 0.0) > (candidates[best].speedup or 0.0) * 1.02:
            best = name
    return best, timing
