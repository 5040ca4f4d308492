"""Generation benchmark: prefill latency, per-token decode latency and tokens/s of cached decoders, interleaved.

``OrtDecoder`` runs a decoder exported by ``export.decoder`` (one graph, or a prefill graph beside it) greedily
with ONNX Runtime's I/O binding: ORT allocates each step's ``present`` tensors and they are bound as the next
step's ``past`` inputs as they are (``OrtValue``), so the cache never passes through numpy; only the token ids,
the mask, the positions and the last position's logits cross per step. ``measure_generation`` times several
variants (ONNX decoders, and torch modules through Hugging Face ``generate``) with the latency runner's
protocol: every variant built first, round-robin rounds with fresh sessions, the order rotated every round,
medians of per-round medians and speedups as medians of per-round ratios against the baseline.

Per variant and batch size: ``prefill_ms`` (the prompt's forward pass, producing the first token),
``decode_ms`` (one decode step, median over the steps), ``tokens_per_s`` (batch x 1000 / decode_ms), peak
memory and file size. Torch variants are timed inside ``generate`` as users call it (its overhead included): a
logits processor that does nothing but read the clock marks each step.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from modelpress.bench.runner import peak_rss, torch_threads, write_json_atomic
from modelpress.errors import ModelpressError
from modelpress.export.decoder import (
    DecoderLayout,
    decoder_layout,
    is_causal_lm,
    positions,
    require_causal_lm,
    torch_greedy,
)
from modelpress.export.files import onnx_file_size
from modelpress.progress import QUIET, Reporter
from modelpress.system import heap_allocations, load_average, system_info
from modelpress.targets import Target, get_target

MEMORY_METHOD = (
    "peak resident memory (MiB) above a baseline taken just before the session is created (ONNX) or generate "
    "is called (torch, plus its parameter bytes), over one generation at the largest batch: weights, arenas, "
    "activations and the key-value cache; measured in this process (/proc/self/clear_refs, VmHWM)"
)

GenVariant = os.PathLike | str | nn.Module | tuple


# ------------------------------------------------------------------------------------------ the loop


def layout_from_onnx(path: os.PathLike | str) -> DecoderLayout:
    """The cache layout of a decoder ONNX file, from its ``genai_config.json`` when one sits beside it, else
    from its inputs' static dimensions (kv heads, head size) and the logits' vocabulary dimension."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelpressError(f"cannot read {path} as ONNX: {exc}", "check that the file is a complete ONNX model") from exc
    inputs = {i.name: i for i in model.graph.input}
    past = sorted(n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    if "input_ids" not in inputs or not past:
        raise ModelpressError(f"{path} is not a decoder with a key-value cache (no input_ids / past_key_values.N.key)",
                              "export a causal LM with `modelpress export CKPT` (it writes the decoder)")

    def dims(value: Any) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

    layers = len(past)
    kv = [dims(inputs[f"past_key_values.{i}.key"]) for i in range(layers)]
    logits = next(o for o in model.graph.output if o.name == "logits")
    elem = inputs["past_key_values.0.key"].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
    max_pos, model_type, heads, hidden, eos, bos, pad = None, None, 0, 0, None, None, None
    cfg_file = path.parent / "genai_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())["model"]
        max_pos, model_type = cfg.get("context_length"), cfg.get("type")
        heads, hidden = cfg["decoder"].get("num_attention_heads", 0), cfg["decoder"].get("hidden_size", 0)
        eos, bos, pad = cfg.get("eos_token_id"), cfg.get("bos_token_id"), cfg.get("pad_token_id")
        # GenAI's model builder leaves the head size symbolic ("kv_cache_dim"): its config has it
        for k in kv:
            if k[1] < 0 and cfg["decoder"].get("num_key_value_heads"):
                k[1] = int(cfg["decoder"]["num_key_value_heads"])
            if k[3] < 0 and cfg["decoder"].get("head_size"):
                k[3] = int(cfg["decoder"]["head_size"])
    return DecoderLayout(model_type=model_type, num_layers=layers, num_heads=heads, kv_heads=[k[1] for k in kv],
                         head_sizes=[k[3] for k in kv], hidden_size=hidden, vocab_size=dims(logits)[-1],
                         max_positions=max_pos, position_ids="position_ids" in inputs, dtype=dtype,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def check_length(layout: DecoderLayout, prompt_len: int, new_tokens: int) -> None:
    """A prompt (plus the tokens to generate) longer than the model's positions is refused, before any work."""
    if prompt_len < 1 or new_tokens < 1:
        raise ModelpressError(f"prompt length {prompt_len} and new tokens {new_tokens} must be at least 1")
    if layout.max_positions is not None and prompt_len + new_tokens > layout.max_positions:
        raise ModelpressError(
            f"a prompt of {prompt_len} tokens plus {new_tokens} new ones is longer than the model's "
            f"{layout.max_positions} positions",
            f"use a prompt of at most {layout.max_positions - new_tokens} tokens, or fewer new tokens",
        )


class OrtDecoder:
    """Greedy generation with an exported decoder, the cache kept in ORT's own buffers (I/O binding)."""

    def __init__(self, session: Any, layout: DecoderLayout, prefill_session: Any = None) -> None:
        self.session, self.layout, self.prefill_session = session, layout, prefill_session
        self._inputs = {i.name for i in session.get_inputs()}

    def _bind(self, session: Any, feed: dict[str, Any]) -> Any:
        import onnxruntime as ort

        io = session.io_binding()
        wanted = {i.name for i in session.get_inputs()}
        for name, value in feed.items():
            if name not in wanted:
                continue
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        for out in session.get_outputs():
            io.bind_output(out.name, "cpu")
        return io

    def step(self, session: Any, feed: dict[str, Any]) -> tuple[np.ndarray, list[Any]]:
        """One forward pass; returns the last position's logits [batch, vocab] and the present OrtValues."""
        io = self._bind(session, feed)
        session.run_with_iobinding(io)
        outs = io.get_outputs()
        logits = outs[0].numpy()[:, -1]
        return logits, outs[1:]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, new_tokens: int,
                 times: list[float] | None = None) -> np.ndarray:
        """``new_tokens`` greedy tokens [batch, new_tokens]; ``times`` receives each step's seconds (the
        first is the prefill)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, prompt = ids.shape
        check_length(self.layout, prompt, new_tokens)
        full_mask = np.ones((batch, prompt + new_tokens), np.int64)
        if attention_mask is not None:
            full_mask[:, :prompt] = attention_mask
        pos_all = positions(full_mask, prompt + new_tokens)
        past: dict[str, Any] = {}
        if self.prefill_session is None:
            past = self.layout.empty_past(batch)
        tokens = np.empty((batch, new_tokens), np.int64)
        session = self.prefill_session or self.session
        for t in range(new_tokens):
            total = prompt + t
            start = 0 if t == 0 else total - 1
            feed = {"input_ids": ids, "attention_mask": np.ascontiguousarray(full_mask[:, :total]), **past}
            if self.layout.position_ids:
                feed["position_ids"] = np.ascontiguousarray(pos_all[:, start:total])
            t0 = time.perf_counter()
            logits, present = self.step(session, feed)
            nxt = logits.argmax(-1).astype(np.int64)
            if times is not None:
                times.append(time.perf_counter() - t0)
            tokens[:, t] = nxt
            past = dict(zip(self.layout.past_names, present, strict=True))
            ids = nxt[:, None]
            session = self.session
        return tokens


# --------------------------------------------------------------------------------------------- results


@dataclass
class GenerationStats:
    """Generation timing of one variant at one batch size."""

    batch: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float  # one decode step (all rows of the batch)
    tokens_per_s: float  # batch * 1000 / decode_ms
    p90_decode_ms: float
    round_prefill_ms: list[float]
    round_decode_ms: list[float]
    prefill_speedup: float | None = None  # median over rounds of baseline / variant
    decode_speedup: float | None = None
    peak_memory_mb: float | None = None


@dataclass
class GenerationVariant:
    name: str
    kind: str  # "onnx", "onnx-two-graphs" or "torch"
    path: str | None
    file_size_bytes: int | None
    stats: list[GenerationStats]
    memory_error: str | None = None


@dataclass
class GenerationReport:
    """All generation measurements of one interleaved run."""

    target: dict[str, Any]
    system: dict[str, Any]
    baseline: str
    rounds: int
    prompt_len: int
    new_tokens: int
    variants: dict[str, GenerationVariant]
    memory_method: str = MEMORY_METHOD
    seconds: float = 0.0
    created: str = ""
    load_average: list[float | None] = field(default_factory=list)

    def stats(self, variant: str, batch: int) -> GenerationStats:
        try:
            found = [s for s in self.variants[variant].stats if s.batch == batch]
        except KeyError:
            raise ModelpressError(f"no variant {variant!r}", f"have: {', '.join(self.variants)}") from None
        if not found:
            raise ModelpressError(f"variant {variant!r} was not measured at batch {batch}")
        return found[0]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "system": self.system, "baseline": self.baseline, "rounds": self.rounds,
                "prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 2),
                "created": self.created, "load_average_1min": self.load_average, "memory_method": self.memory_method,
                "variants": {n: asdict(v) for n, v in self.variants.items()}}

    def write_json(self, path: os.PathLike | str) -> Path:
        return write_json_atomic(path, self.to_dict())

    def to_table(self, title: str | None = None):  # noqa: ANN201 - rich.table.Table
        from rich.table import Table

        table = Table(title=title or (f"generation on {self.target.get('name')} ({self.target.get('threads')} threads), "
                                      f"prompt {self.prompt_len}, {self.new_tokens} new tokens"))
        for col in ("variant", "batch", "prefill ms", "decode ms/token", "tokens/s", f"decode vs {self.baseline}",
                    "peak MiB", "size MB"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for v in self.variants.values():
            for s in v.stats:
                table.add_row(v.name, str(s.batch), f"{s.prefill_ms:.2f}", f"{s.decode_ms:.2f}", f"{s.tokens_per_s:.1f}",
                              "-" if s.decode_speedup is None else f"{s.decode_speedup:.2f}x",
                              "-" if s.peak_memory_mb is None else f"{s.peak_memory_mb:.0f}",
                              "-" if v.file_size_bytes is None else f"{v.file_size_bytes / 1e6:.1f}")
        return table


# ------------------------------------------------------------------------------------------- measuring


class _Runner:
    """One variant's generator for one round: fresh sessions (ONNX) or the module (torch)."""

    def __init__(self, value: Any, layout: DecoderLayout, target: Target) -> None:
        self.module = value if isinstance(value, nn.Module) else None
        if self.module is None:
            path, prefill = (value if isinstance(value, tuple) else (value, None))
            self.decoder = OrtDecoder(target.session(Path(path)), layout,
                                      None if prefill is None else target.session(Path(prefill)))

    def _steps(self, ids: np.ndarray, new_tokens: int) -> list[float]:
        times: list[float] = []
        if self.module is not None:  # generate's own steps, clocked by a logits processor
            torch_greedy(self.module, ids, np.ones_like(ids), new_tokens, times)
        else:
            self.decoder.generate(ids, None, new_tokens, times)
        return times

    def prefill(self, ids: np.ndarray) -> float:
        """Seconds of the prompt's forward pass (to the first token's logits)."""
        return self._steps(ids, 1)[0]

    def decode(self, ids: np.ndarray, new_tokens: int) -> list[float]:
        """Seconds of each decode step after the prefill over ``new_tokens`` tokens."""
        return self._steps(ids, new_tokens)[1:]


def _size(value: Any) -> tuple[str, str | None, int | None]:
    if isinstance(value, nn.Module):
        seen, total = set(), 0
        for t in list(value.parameters()) + list(value.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return "torch", None, total
    if isinstance(value, tuple):
        return "onnx-two-graphs", str(value[0]), sum(onnx_file_size(p) for p in value)
    return "onnx", str(value), onnx_file_size(value)


@heap_allocations()  # timed loops: no page faults per allocation (system.unmap_large_blocks)
def measure_generation(
    variants: Mapping[str, GenVariant],
    target: Target | str = "ort-cpu",
    *,
    layout: DecoderLayout | None = None,
    prompt_len: int | None = None,
    new_tokens: int = 32,
    batch_sizes: list[int] | None = None,
    rounds: int = 3,
    prefill_runs: int = 3,
    baseline: str | None = None,
    memory: bool = True,
    seed: int = 0,
    reporter: Reporter = QUIET,
) -> GenerationReport:
    """Time greedy generation of ONNX decoders (a path, or ``(decoder, prefill)`` paths for the two-graph form)
    and torch causal LMs (``generate``) interleaved on ``target``; see the module docstring.

    ``prompt_len`` defaults to 128, capped at the model's positions less ``new_tokens``; a longer prompt given
    explicitly is an error. ``batch_sizes`` default to 1 and 8.
    """
    started = time.perf_counter()
    load_before = load_average()
    target = get_target(target)
    if not variants:
        raise ModelpressError("nothing to measure: no variants given")
    if rounds < 1 or prefill_runs < 1:
        raise ModelpressError(f"rounds and prefill runs must be at least 1 (got {rounds}, {prefill_runs})")
    names = list(variants)
    baseline = names[0] if baseline is None else baseline
    if baseline not in variants:
        raise ModelpressError(f"baseline {baseline!r} is not one of the variants", f"use one of: {', '.join(names)}")
    for name, value in variants.items():
        if isinstance(value, nn.Module):
            require_causal_lm(value)
        else:
            for p in value if isinstance(value, tuple) else (value,):
                if not Path(p).is_file():
                    raise ModelpressError(f"variant {name!r}: no ONNX file at {p}", "export the decoder first")
    def own_layout(value: GenVariant) -> DecoderLayout:
        return (decoder_layout(value) if isinstance(value, nn.Module)
                else layout_from_onnx(value[0] if isinstance(value, tuple) else value))

    # each variant runs with its own cache layout (a pruned model may have fewer layers or heads); ``layout``,
    # when given, is the baseline's, and the prompts follow it
    layouts = {n: (layout if n == baseline and layout is not None else own_layout(v)) for n, v in variants.items()}
    layout = layouts[baseline]
    if prompt_len is None:
        prompt_len = 128 if layout.max_positions is None else max(1, min(128, layout.max_positions - new_tokens))
    check_length(layout, prompt_len, new_tokens)
    batches = sorted(set(batch_sizes or [1, 8]))
    rng = np.random.default_rng(seed)
    prompts = {b: rng.integers(2 if layout.vocab_size > 8 else 0, layout.vocab_size, size=(b, prompt_len)).astype(np.int64)
               for b in batches}

    peak: dict[str, float | None] = {}
    memory_errors: dict[str, str] = {}
    prefill: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in names}
    decode: dict[str, dict[int, list[list[float]]]] = {n: {b: [] for b in batches} for n in names}
    with torch_threads(target.threads):
        if memory:
            for name in reporter.track(names, "probing generation memory"):
                try:
                    with peak_rss() as mem:
                        runner = _Runner(variants[name], layouts[name], target)
                        runner.decode(prompts[batches[-1]], new_tokens)
                    extra = _size(variants[name])[2] if isinstance(variants[name], nn.Module) else 0
                    peak[name] = None if mem["mb"] is None else mem["mb"] + (extra or 0) / 2**20
                    del runner
                except Exception as exc:  # a failed probe must not lose the timings
                    memory_errors[name] = f"{type(exc).__name__}: {exc}"
        jobs = [(r, names[(r + i) % len(names)]) for r in range(rounds) for i in range(len(names))]
        for _, name in reporter.track(jobs, f"timing generation of {len(names)} variants x {rounds} rounds"):
            runner = _Runner(variants[name], layouts[name], target)
            runner.decode(prompts[batches[0]][:, : min(prompt_len, 8)], 2)  # warm-up
            for b in batches:
                runner.prefill(prompts[b])  # warm-up at this shape
                pre = float(np.median([runner.prefill(prompts[b]) for _ in range(prefill_runs)]))
                prefill[name][b].append(pre * 1000.0)
                decode[name][b].append([s * 1000.0 for s in runner.decode(prompts[b], new_tokens)])
            del runner
            gc.collect()

    results: dict[str, GenerationVariant] = {}
    for name in names:
        stats = []
        for b in batches:
            dec_rounds = [float(np.median(d)) for d in decode[name][b]]
            base_dec = [float(np.median(d)) for d in decode[baseline][b]]
            pooled = [x for d in decode[name][b] for x in d]
            pre, dec = float(np.median(prefill[name][b])), float(np.median(dec_rounds))
            stats.append(GenerationStats(
                batch=b, prompt_len=prompt_len, new_tokens=new_tokens, prefill_ms=pre, decode_ms=dec,
                tokens_per_s=b * 1000.0 / dec if dec > 0 else 0.0, p90_decode_ms=float(np.percentile(pooled, 90)),
                round_prefill_ms=prefill[name][b], round_decode_ms=dec_rounds,
                prefill_speedup=_ratio(prefill[baseline][b], prefill[name][b]), decode_speedup=_ratio(base_dec, dec_rounds),
                peak_memory_mb=peak.get(name) if b == batches[-1] else None,
            ))
        kind, path, size = _size(variants[name])
        results[name] = GenerationVariant(name, kind, path, size, stats, memory_errors.get(name))
    return GenerationReport(
        target=target.to_dict(), system=system_info(target.threads), baseline=baseline, rounds=rounds,
        prompt_len=prompt_len, new_tokens=new_tokens, variants=results, seconds=time.perf_counter() - started,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_average=[load_before, load_average()],
    )


def _ratio(base: list[float], variant: list[float]) -> float | None:
    ratios = [b / v for b, v in zip(base, variant, strict=True) if v > 0]
    return float(np.median(ratios)) if ratios else None


__all__ = ["GenerationReport", "GenerationStats", "GenerationVariant", "OrtDecoder", "check_length",
           "is_causal_lm", "layout_from_onnx", "measure_generation"]
