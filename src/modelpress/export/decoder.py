"""Causal-LM decoder export with a key-value cache, in ONNX Runtime GenAI's naming, verified by generation.

``export_decoder`` writes one ONNX graph that serves prefill and decode alike: inputs ``input_ids``
[batch, sequence], ``attention_mask`` [batch, past + sequence] (int64), ``position_ids`` [batch, sequence]
(where the model's forward takes them) and ``past_key_values.N.key`` / ``.value`` [batch, kv_heads,
past, head_size] with a past length that may be 0 (the prefill); outputs ``logits`` [batch, sequence,
vocab] and ``present.N.key`` / ``.value`` [batch, kv_heads, past + sequence, head_size]. These are the
names ONNX Runtime GenAI's model builder writes, so with ``write_genai_config`` the folder runs under
``onnxruntime_genai.Model``. ``two_graphs=True`` also writes a prefill graph without past inputs (the
form some runtimes use); the measurement in the report (see ``bench.generation``) decided for one graph.

The export traces the Hugging Face model with eager attention (as ``export_onnx`` does) around a wrapper
that builds a ``DynamicCache`` from the past inputs. ``verify_decoder`` then checks it the way a user
runs it: greedy tokens from an ONNX Runtime loop (prefill, then one token at a time through the cache)
must equal torch ``generate``'s for ``new_tokens`` tokens on held-out prompts (one of them left-padded),
and every logit produced through the cache must match torch's uncached full-sequence logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export.files import move_onnx, onnx_file_size
from modelpress.export.onnx import attention_implementation
from modelpress.export.streamed import STREAM_MIN_BYTES, export_streamed, weight_bytes
from modelpress.graph.run import accepts_kwarg, eval_mode
from modelpress.progress import QUIET, Reporter
from modelpress.targets import cpu_session

__all__ = [
    "DecoderExport",
    "DecoderLayout",
    "DecoderLowering",
    "DecoderVerification",
    "decoder_layout",
    "export_decoder",
    "fusable",
    "greedy_onnx",
    "is_causal_lm",
    "verify_decoder",
    "write_genai_config",
]

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# Hugging Face model_type -> ONNX Runtime GenAI model type (the decoder-only types it runs with this layout).
# GenAI's own "gpt2" type expects the old combined past_N cache; with separate key/value inputs GPT-2 runs as
# its generic decoder-only type ("llama": the type picks the cache handling, the graph does the rest).
GENAI_TYPES = {"gpt2": "llama", "llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "phi3": "phi3",
               "gemma": "gemma", "granite": "granite", "olmo": "olmo"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


# ------------------------------------------------------------------------------------------- layout


@dataclass
class DecoderLayout:
    """The cache layout of a causal LM: what its decoder graph takes and returns."""

    model_type: str | None  # Hugging Face config.model_type
    num_layers: int
    num_heads: int
    kv_heads: list[int]  # per layer (pruning can make them differ)
    head_sizes: list[int]  # per layer
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    position_ids: bool  # the graph takes position_ids (a fused rotary graph does not: the kernel places tokens)
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else [])
        return names + self.past_names

    @property
    def past_names(self) -> list[str]:
        return [n % i for i in range(self.num_layers) for n in (PAST_KEY, PAST_VALUE)]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [n % i for i in range(self.num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past inputs of length 0 (the prefill's)."""
        dtype = np.dtype(self.dtype)
        return {name: np.zeros((batch, self.kv_heads[i // 2], 0, self.head_sizes[i // 2]), dtype)
                for i, name in enumerate(self.past_names)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_causal_lm(module: nn.Module) -> bool:
    """A Hugging Face model that can generate (a ``*ForCausalLM`` or ``*LMHeadModel`` with an LM head)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not isinstance(module, PreTrainedModel):
        return False
    can = getattr(module, "can_generate", None)
    return bool(can and can()) and module.get_output_embeddings() is not None


def require_causal_lm(module: nn.Module) -> None:
    """Raise a short ModelpressError when ``module`` cannot generate."""
    if not is_causal_lm(module):
        raise ModelpressError(
            f"{type(module).__name__} is not a causal language model with an LM head, so it cannot generate",
            "give a *ForCausalLM / *LMHeadModel checkpoint (e.g. GPT2LMHeadModel, LlamaForCausalLM)",
        )


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def decoder_layout(module: nn.Module) -> DecoderLayout:
    """Read the cache layout by running the model once on one token with the cache on."""
    require_causal_lm(module)
    config = module.config
    param = next(module.parameters())
    with torch.inference_mode(), eval_mode(module):
        out = module(input_ids=torch.zeros((1, 1), dtype=torch.long, device=param.device), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers:
        raise ModelpressError(f"{type(module).__name__} returned no key-value cache", "this family cannot be exported with a cache yet")
    kv_heads = [int(layer.keys.shape[1]) for layer in layers]
    head_sizes = [int(layer.keys.shape[3]) for layer in layers]
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0))
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    gen = getattr(module, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None and gen is not None:
        eos = gen.eos_token_id
    return DecoderLayout(
        model_type=getattr(config, "model_type", None), num_layers=len(layers), num_heads=heads,
        kv_heads=kv_heads, head_sizes=head_sizes, hidden_size=hidden, vocab_size=int(out.logits.shape[-1]),
        max_positions=int(max_pos) if max_pos else None, position_ids=accepts_kwarg(module, "position_ids"),
        dtype=str(param.dtype).removeprefix("torch."), bos_token_id=_first_int(getattr(config, "bos_token_id", None)),
        eos_token_id=eos, pad_token_id=_first_int(getattr(config, "pad_token_id", None)),
    )


# ----------------------------------------------------------------------------------------- the graph


@dataclass
class DecoderLowering:
    """How a method's own layers trace into the cached decoder graph (given by the method's pass; the export
    layer knows no method). ``context`` is entered while tracing (e.g. packed weight-only layers then trace to
    ``com.microsoft.MatMulNBits``), ``custom_opsets`` go to ``torch.onnx.export`` and ``postprocess`` edits
    the traced model in place (drop the tracer's value_info, fold biases into the contrib op). The result is
    verified strictly against the torch model. ``fast`` (optional) then edits the verified model into a
    faster approximate form (e.g. MatMulNBits with int8 activations); that form is kept when it still
    passes verification at ``fast_rtol`` (allowed logit error relative to the largest logit), and both
    checks are reported."""

    name: str
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    custom_opsets: dict[str, int] = field(default_factory=dict)
    postprocess: Callable[[Any], Any] | None = None
    fast: Callable[[Any], str | None] | None = None  # edits the onnx.ModelProto; returns what it did, or None
    fast_rtol: float = 0.02


class CachedDecoder(nn.Module):
    """``(input_ids, attention_mask, [position_ids], *past) -> (logits, *present)`` around a HF causal LM."""

    def __init__(self, model: nn.Module, layout: DecoderLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> tuple:
        from transformers import DynamicCache

        position_ids = rest[0] if self.layout.position_ids else None
        past = rest[1:] if self.layout.position_ids else rest
        cache = DynamicCache()
        for i in range(self.layout.num_layers if past else 0):  # no past inputs: the prefill-only graph
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs: dict[str, Any] = {"position_ids": position_ids} if position_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True, **kwargs)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class FusedDecoder(CachedDecoder):
    """``CachedDecoder``'s signature with ONNX Runtime's fused attention (``export.fused``): each attention module
    takes its past from and puts its present into ``state``; ``seqlens_k``/``total_sequence_length`` and the
    padding bias are built once per step from ``attention_mask`` (every cache row kept, pads masked)."""

    def __init__(self, model: nn.Module, layout: DecoderLayout, state: Any) -> None:
        super().__init__(model, layout)
        self.state = state
        # buffers: one initializer shared by every layer's GroupQueryAttention (its cos/sin caches)
        if state.cos is not None:
            self.register_buffer("cos_cache", state.cos, persistent=False)
            self.register_buffer("sin_cache", state.sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> tuple:
        from modelpress.export.fused import attention_inputs

        layout, state = self.layout, self.state
        position_ids = rest[0] if layout.position_ids else None
        past = rest[1:] if layout.position_ids else rest
        if not past:  # the prefill-only graph: empty caches of the input's batch
            dtype = getattr(torch, layout.dtype)
            past = []
            for i in range(layout.num_layers):
                empty = input_ids.new_zeros((input_ids.shape[0], layout.kv_heads[i], 0, layout.head_sizes[i]), dtype=dtype)
                past += [empty, empty]
        state.past = [(past[2 * i], past[2 * i + 1]) for i in range(layout.num_layers)]
        state.present = {}
        state.seqlens_k, state.total, state.bias = attention_inputs(attention_mask, input_ids, past[0].dtype)
        if state.cos is not None:
            state.cos, state.sin = self.cos_cache, self.sin_cache
        kwargs: dict[str, Any] = {"position_ids": position_ids} if position_ids is not None else {}
        out = self.model(input_ids=input_ids, use_cache=False, **kwargs)
        present = []
        for i in range(layout.num_layers):
            present += list(state.present[i])
        return (out.logits, *present)


def _trace_inputs(layout: DecoderLayout, vocab: int, device: torch.device, past: int) -> tuple:
    batch, seq = 2, 3
    dtype = getattr(torch, layout.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones((batch, past + seq), dtype=torch.long, device=device)
    args: list[torch.Tensor] = [ids, mask]
    if layout.position_ids:
        args.append(torch.arange(past, past + seq, device=device).expand(batch, seq).contiguous())
    if past:
        for i in range(layout.num_layers):
            shape = (batch, layout.kv_heads[i], past, layout.head_sizes[i])
            args += [torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype)]
    return tuple(args)


def _export_graph(module: nn.Module, layout: DecoderLayout, path: Path, opset: int, with_past: bool,
                  lowering: DecoderLowering | None = None, fused: bool = False) -> None:
    from modelpress.export.fused import (
        FusedState,
        attention_adapters,
        drop_empty_inputs,
        fuse_skip_norms,
        fused_attention,
        norm_adapters,
        pack_attention_inputs,
    )

    forwards: dict = {}
    if fused:
        state = FusedState()
        forwards = attention_adapters(module, layout, state) or {}
        if not forwards:
            raise ModelpressError("the fused attention export does not cover this model")
        forwards.update(norm_adapters(module))
        wrapper: nn.Module = FusedDecoder(module, layout, state).eval()
    else:
        wrapper = CachedDecoder(module, layout).eval()
    args = _trace_inputs(layout, layout.vocab_size, next(module.parameters()).device, 5 if with_past else 0)
    names_in = layout.input_names if with_past else layout.input_names[: len(layout.input_names) - len(layout.past_names)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    if layout.position_ids:
        axes["position_ids"] = {0: "batch_size", 1: "sequence_length"}
    for name in layout.past_names if with_past else []:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in layout.output_names[1:]:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    lowered = lowering.context() if lowering is not None else contextlib.nullcontext()
    opsets = dict(lowering.custom_opsets) if lowering is not None else {}
    if fused:
        opsets["com.microsoft"] = 1
    with (eval_mode(module), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          torch.inference_mode(False), torch.no_grad(), lowered, fused_attention(forwards)):
        warnings.simplefilter("ignore")
        # no constant folding: folding writes the transposed copy of every Linear weight, and of a tied
        # embedding/LM head that is a second vocabulary-sized tensor in the file (27M Llama: 124 MB file
        # vs 107 MB of weights); ONNX Runtime folds the transposes at session creation, and the unfolded
        # file decoded as fast (21.6 vs 21.9 ms/token, 1 thread, interleaved)
        kwargs = {"output_names": layout.output_names, "dynamic_axes": axes, "opset_version": opset, "dynamo": False,
                  **({"custom_opsets": opsets} if opsets else {})}
        if weight_bytes(module) >= STREAM_MIN_BYTES:  # torch's exporter would hold ~3 more copies of the weights
            export_streamed(wrapper, args, path, input_names=names_in, fold_transposes=False, **kwargs)
        else:
            torch.onnx.export(wrapper, args, str(path), input_names=names_in, do_constant_folding=False, **kwargs)
    if fused or (lowering is not None and lowering.postprocess is not None):
        import onnx

        # the fused form's rewrites edit the graph only: a streamed export's weights stay in their data file
        graph_only = lowering is None or lowering.postprocess is None
        in_place = graph_only and path.with_name(path.name + ".data").is_file()
        model = onnx.load(str(path), load_external_data=not in_place)
        if fused:
            del model.graph.value_info[:]  # the tracer's guesses around the contrib ops; ONNX Runtime infers its own
            drop_empty_inputs(model)
            fuse_skip_norms(model)
            _static_output_dims(model, layout)
        if lowering is not None and lowering.postprocess is not None:
            lowering.postprocess(model)
        if fused:
            pack_attention_inputs(model)
        if in_place:  # the graph alone, its tensors still pointing into <path>.data
            tmp = path.with_name(path.stem + ".partial.onnx")
            onnx.save(model, str(tmp))
            tmp.replace(path)
        else:
            _save_onnx(model, path)


def _static_output_dims(model: Any, layout: DecoderLayout) -> None:
    """Write the outputs' fixed dimensions (vocabulary; kv heads and head size of the present cache) that the
    tracer could not infer through the contrib ops."""
    fixed = {"logits": {2: layout.vocab_size}}
    for i in range(layout.num_layers):
        for name in (PRESENT_KEY % i, PRESENT_VALUE % i):
            fixed[name] = {1: layout.kv_heads[i], 3: layout.head_sizes[i]}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, value in fixed.get(out.name, {}).items():
            if axis < len(dims):
                dims[axis].dim_value = int(value)


def _save_onnx(model: Any, path: Path) -> None:
    """Save ``model`` at ``path`` (a new name then a rename), with external data when it would pass 2 GB."""
    import onnx

    tmp = path.with_name(path.stem + ".partial.onnx")
    large = model.ByteSize() > 2**31 - 2**26
    data = path.with_name(path.name + ".data")  # a streamed export's, already loaded into ``model``
    data.unlink(missing_ok=True)
    onnx.save(model, str(tmp), save_as_external_data=large, all_tensors_to_one_file=True,
              location=data.name if large else None)
    tmp.replace(path)


# -------------------------------------------------------------------------------------- generation


def positions(mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids of the last ``new`` tokens from the attention mask (left padding: pads get 1, as HF)."""
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 1, pos)
    return pos[:, -new:].astype(np.int64)


def greedy_onnx(session: Any, layout: DecoderLayout, input_ids: np.ndarray, attention_mask: np.ndarray,
                new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy generation through the cache with plain ``session.run`` (the reference loop verification uses;
    ``bench.generation`` has the timed loop with I/O binding). Returns the new tokens [batch, new_tokens] and
    the logits of every step (the prefill's for all prompt positions, then one position per step)."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    past = layout.empty_past(ids.shape[0])
    wanted = {i.name for i in session.get_inputs()}
    tokens, logits = [], []
    for _ in range(new_tokens):
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask, **past}
        if layout.position_ids:
            feed["position_ids"] = positions(mask, ids.shape[1])
        outs = session.run(None, {k: v for k, v in feed.items() if k in wanted})
        logits.append(outs[0])
        nxt = outs[0][:, -1].argmax(-1).astype(np.int64)
        tokens.append(nxt)
        past = dict(zip(layout.past_names, outs[1:], strict=True))
        ids = nxt[:, None]
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    return np.stack(tokens, axis=1), logits


class _StepClock:
    """A logits processor that only records when ``generate`` reaches each step (after each forward pass)."""

    def __init__(self, times: list[float]) -> None:
        self.times = times

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def torch_greedy(module: nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                 times: list[float] | None = None) -> np.ndarray:
    """torch ``generate`` (greedy, with its cache, no early stop at end-of-text): the new tokens. ``times``
    receives each step's seconds as ``generate`` runs it (the first: from the call to the first token's logits)."""
    from transformers import GenerationConfig, LogitsProcessorList

    like = next(module.parameters())
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=like.device)
    mask = torch.as_tensor(attention_mask, dtype=torch.long, device=like.device)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, num_beams=1, use_cache=True,
                           pad_token_id=0, eos_token_id=None, bos_token_id=None)
    stamps: list[float] = []
    processors = LogitsProcessorList([_StepClock(stamps)]) if times is not None else None
    with torch.inference_mode(), eval_mode(module):
        start = time.perf_counter()
        out = module.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, logits_processor=processors)
    if times is not None:
        times.extend(np.diff([start, *stamps]).tolist())
    return out[:, ids.shape[1]:].cpu().numpy()


def held_out_prompts(layout: DecoderLayout, new_tokens: int, *, batch: int = 2, length: int = 12,
                     seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Seeded prompts unlike the trace's (another seed, another length); the last row left-padded by 3."""
    if layout.max_positions is not None:
        length = max(1, min(length, layout.max_positions - new_tokens))
    rng = np.random.default_rng(seed)
    low = 0 if layout.vocab_size < 8 else 2  # keep clear of the usual special ids
    ids = rng.integers(low, layout.vocab_size, size=(batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if batch > 1 and length > 4:
        mask[-1, :3] = 0
        ids[-1, :3] = layout.pad_token_id or 0
    return ids, mask


@dataclass
class DecoderVerification:
    """ONNX Runtime's cached generation against torch on held-out prompts."""

    tokens_equal: bool
    new_tokens: int
    first_mismatch: int | None  # step of the first differing token, None when equal
    max_abs_err: float  # cached ONNX logits vs torch's uncached full-sequence logits (unpadded positions)
    reference_max: float
    atol: float
    rtol: float
    prompts: list[int] = field(default_factory=list)  # batch, prompt length
    # at the first differing step: |logit(ORT's token) - logit(torch's token)| in ORT's logits (None: equal)
    tie_margin: float | None = None
    uncached_tokens_equal: bool | None = None  # torch's full-sequence greedy picks ONNX Runtime's tokens
    # torch generate's tokens on these prompts (reused by a second check of the same model; not reported)
    reference_tokens: Any = field(default=None, repr=False, compare=False)

    @property
    def allowed_error(self) -> float:
        return self.atol + self.rtol * self.reference_max

    @property
    def logits_ok(self) -> bool:
        return self.max_abs_err <= self.allowed_error

    @property
    def tie(self) -> bool:
        """The tokens part at a near-tie: two tokens whose logits differ by less than the allowed error (float
        rounding picks either); the sequences after it are different continuations, not an export error."""
        return not self.tokens_equal and self.tie_margin is not None and self.tie_margin <= self.allowed_error

    @property
    def ok(self) -> bool:
        """Logits within tolerance, and greedy tokens equal to torch ``generate``'s (or parted at a near-tie, or
        equal to the greedy tokens of torch's own uncached forward where ``generate`` disagrees with it: seen on
        a pruned Llama, left open)."""
        return (self.tokens_equal or self.tie or bool(self.uncached_tokens_equal)) and self.logits_ok

    def describe(self) -> str:
        tokens = ("greedy tokens equal" if self.tokens_equal
                  else f"greedy tokens differ from step {self.first_mismatch}"
                  + (f" at a near-tie (logits {self.tie_margin:.2g} apart)" if self.tie else "")
                  + ("; torch's uncached forward picks ONNX Runtime's tokens" if not self.tokens_equal
                     and self.uncached_tokens_equal else ""))
        return (f"{tokens} ({self.new_tokens} new tokens), cached logits max abs error {self.max_abs_err:.3g} "
                f"(allowed {self.allowed_error:.3g})")

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "reference_tokens"}
        return {**out, "tie": self.tie, "ok": self.ok}


def verify_decoder(path: Path | str, module: nn.Module, layout: DecoderLayout | None = None, *,
                   new_tokens: int = 32, prompts: tuple[np.ndarray, np.ndarray] | None = None,
                   atol: float = 1e-3, rtol: float = 1e-4, reference_tokens: np.ndarray | None = None
                   ) -> DecoderVerification:
    """Greedy tokens of the ONNX decoder (through its cache) against torch ``generate`` and its cached logits
    against torch's uncached full-sequence logits on the same tokens. ``reference_tokens``: torch
    ``generate``'s tokens on the same prompts, when an earlier check of the same model has them."""
    layout = layout or decoder_layout(module)
    ids, mask = prompts if prompts is not None else held_out_prompts(layout, new_tokens)
    if layout.max_positions is not None:
        new_tokens = max(1, min(new_tokens, layout.max_positions - ids.shape[1]))
    with attention_implementation(module, "eager"):
        reference = torch_greedy(module, ids, mask, new_tokens) if reference_tokens is None else reference_tokens
        session = cpu_session(path)
        got, step_logits = greedy_onnx(session, layout, ids, mask, new_tokens)
        # the whole sequence at once, without a cache, on the tokens ONNX Runtime generated
        full_ids = np.concatenate([ids, got[:, :-1]], axis=1)
        full_mask = np.concatenate([mask, np.ones_like(got[:, :-1])], axis=1)
        like = next(module.parameters())
        kwargs: dict[str, Any] = {}
        if layout.position_ids:
            kwargs["position_ids"] = torch.as_tensor(positions(full_mask, full_ids.shape[1]), device=like.device)
        with torch.inference_mode(), eval_mode(module):
            full = module(input_ids=torch.as_tensor(full_ids, device=like.device),
                          attention_mask=torch.as_tensor(full_mask, device=like.device), use_cache=False,
                          **kwargs).logits.float().cpu().numpy()
    cached = np.concatenate(step_logits, axis=1).astype(np.float64)
    valid = full_mask.astype(bool)
    diff = np.abs(cached - full)[valid]
    mismatch = np.nonzero((got != reference).any(axis=0))[0] if got.shape == reference.shape else np.array([0])
    ref_max = float(np.abs(full[valid]).max())
    tie = None
    if mismatch.size and got.shape == reference.shape:
        # a near-tie: at the first differing step ONNX Runtime's logits rank both tokens within the allowed error
        step, rows = int(mismatch[0]), np.nonzero(got[:, mismatch[0]] != reference[:, mismatch[0]])[0]
        last = step_logits[step][:, -1]
        tie = float(np.max(np.abs(last[rows, got[rows, step]] - last[rows, reference[rows, step]])))
    # does torch's own uncached forward pick ONNX Runtime's tokens? (greedy on the full-sequence logits)
    torch_full = full[:, ids.shape[1] - 1:].argmax(-1)
    return DecoderVerification(
        tokens_equal=not mismatch.size, uncached_tokens_equal=bool((torch_full == got).all()), new_tokens=new_tokens,
        first_mismatch=int(mismatch[0]) if mismatch.size else None, max_abs_err=float(diff.max()),
        reference_max=ref_max, atol=atol, rtol=rtol, prompts=list(ids.shape), tie_margin=tie,
        reference_tokens=reference,
    )


# ------------------------------------------------------------------------------------------- export


@dataclass
class DecoderExport:
    """What ``export_decoder`` wrote."""

    path: Path
    layout: DecoderLayout
    verification: DecoderVerification | None
    file_size_bytes: int
    export_seconds: float
    prefill_path: Path | None = None  # the two-graph form's prefill graph
    opset: int = 17
    lowering: dict[str, Any] | None = None  # a method's lowering: its name, the fast form and its check
    attention: dict[str, Any] | None = None  # the attention form written (fused or plain) and why

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "prefill_path": None if self.prefill_path is None else str(self.prefill_path),
                "layout": self.layout.to_dict(), "file_size_bytes": self.file_size_bytes,
                "export_seconds": round(self.export_seconds, 2), "opset": self.opset, "lowering": self.lowering,
                "attention": self.attention,
                "verification": None if self.verification is None else self.verification.to_dict()}


def fusable(module: nn.Module, layout: DecoderLayout | None = None) -> bool:
    """Whether every attention module of ``module`` has a fused (GroupQueryAttention) form (``export.fused``)."""
    from modelpress.export.fused import FusedState, attention_adapters

    layout = layout or decoder_layout(module)
    return bool(layout.position_ids and attention_adapters(module, layout, FusedState()))


def export_decoder(module: nn.Module, path: Path | str, *, opset: int = 17, verify: bool = True,
                   new_tokens: int = 32, two_graphs: bool = False, atol: float = 1e-3, rtol: float = 1e-4,
                   lowering: DecoderLowering | None = None, fused: bool | str = "auto",
                   reporter: Reporter = QUIET) -> DecoderExport:
    """Export a causal LM as one cached decoder graph at ``path`` (GenAI naming; see the module docstring).

    ``verify`` checks greedy generation of ``new_tokens`` tokens and the cached logits against torch and
    raises ModelpressError on a mismatch. ``two_graphs`` also writes ``<stem>.prefill.onnx``, a graph
    without past inputs. ``lowering``: a method's own lowering of its layers (see :class:`DecoderLowering`).
    ``fused``: ONNX Runtime's fused attention (GroupQueryAttention with its own rotary, ``export.fused``);
    "auto" uses it where every attention module has a fused form and the fused graph verifies, else the
    plain-op graph (measured on the 22M stdlib Llama, INT4, 2 threads, one decode step at past 128: 16.7 ms
    fused vs 40.6 ms plain, 132 vs 643 ONNX Runtime nodes); True requires it, False never uses it.
    Nothing appears at ``path`` unless everything succeeded.
    """
    started = time.perf_counter()
    path = Path(path)
    layout = decoder_layout(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fused not in (True, False, "auto"):
        raise ModelpressError(f"fused must be True, False or 'auto' (got {fused!r})")
    covered = fused is not False and fusable(module, layout)
    if fused is True and not covered:
        raise ModelpressError(f"{type(module).__name__} has attention modules without a fused form (sliding "
                              "window, partial rotary, per-head norms or an unknown family)",
                              "export with fused=False (plain ops)")
    workdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.decoder-"))
    try:
        attempts = [True, False] if covered and fused == "auto" else [covered]
        attention: dict[str, Any] = {}
        for attempt in attempts:
            try:
                staged, prefill, verification, used = _export_verified(module, layout, workdir, opset, two_graphs,
                                                                       lowering, attempt, verify, new_tokens, atol,
                                                                       rtol, reporter)
            except ModelpressError as exc:
                if attempt is not True or len(attempts) == 1:
                    raise
                attention["fused_rejected"] = str(exc)[:300]
                continue
            attention["form"] = "fused (com.microsoft GroupQueryAttention)" if attempt else "plain ops"
            layout = used
            break
        lowered = None
        if lowering is not None:
            lowered = {"name": lowering.name}
            if lowering.fast is not None and verification is not None:
                with reporter.step(f"{lowering.name}: checking the faster approximate form"):
                    lowered.update(_fast_form(lowering, staged, prefill, module, layout, new_tokens, atol,
                                              verification.reference_tokens))
        prefill_dst = None
        if prefill is not None:
            prefill_dst = path.with_name(path.stem + ".prefill.onnx")
            move_onnx(prefill, prefill_dst)
        move_onnx(staged, path)
        size = onnx_file_size(path) + (onnx_file_size(prefill_dst) if prefill_dst else 0)
        return DecoderExport(path, layout, verification, size, time.perf_counter() - started, prefill_dst, opset,
                             lowered, attention)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _export_verified(module: nn.Module, layout: DecoderLayout, workdir: Path, opset: int, two_graphs: bool,
                     lowering: DecoderLowering | None, fused: bool, verify: bool, new_tokens: int, atol: float,
                     rtol: float, reporter: Reporter) -> tuple[Path, Path | None, DecoderVerification | None,
                                                               DecoderLayout]:
    """One export (fused or plain) into ``workdir``, verified when ``verify``, with the layout the graph takes
    (a fused rotary graph has no ``position_ids``: the kernel places the tokens); ModelpressError when it fails."""
    form = "fused attention" if fused else "plain ops"
    staged = workdir / "decoder.onnx"
    prefill = workdir / "prefill.onnx" if two_graphs else None
    with (reporter.step(f"exporting the decoder with a key-value cache ({form}, opset {opset})"),
          attention_implementation(module, "eager")):
        try:
            _export_graph(module, layout, staged, opset, with_past=True, lowering=lowering, fused=fused)
            if prefill is not None:
                _export_graph(module, layout, prefill, opset, with_past=False, lowering=lowering, fused=fused)
        except ModelpressError:
            raise
        except Exception as exc:
            raise ModelpressError(f"the decoder export ({form}) failed: {type(exc).__name__}: {str(exc)[:300]}",
                                  "this model family may not support a DynamicCache yet") from exc
    if layout.position_ids and "position_ids" not in _graph_inputs(staged):
        layout = dataclasses.replace(layout, position_ids=False)
    verification = None
    if verify:
        with reporter.step(f"verifying greedy generation ({new_tokens} tokens) against torch"):
            try:
                verification = verify_decoder(staged, module, layout, new_tokens=new_tokens, atol=atol, rtol=rtol)
            except ModelpressError:
                raise
            except Exception as exc:  # e.g. ONNX Runtime refuses the graph: a short error, nothing written
                raise ModelpressError(
                    f"the exported decoder ({form}) does not run in ONNX Runtime: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                    "a compressed form the cached export does not lower yet; report the recipe") from exc
        if not verification.ok:
            raise ModelpressError(f"the decoder export ({form}) does not match torch: {verification.describe()}",
                                  "loosen atol for quantized models, or report the model family")
    return staged, prefill, verification, layout


def _graph_inputs(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _fast_form(lowering: DecoderLowering, staged: Path, prefill: Path | None, module: nn.Module,
               layout: DecoderLayout, new_tokens: int, atol: float, reference: np.ndarray | None) -> dict[str, Any]:
    """Apply ``lowering.fast`` to the verified graph(s) and keep it where it verifies at ``fast_rtol``."""
    import onnx

    model = onnx.load(str(staged))
    what = lowering.fast(model) if lowering.fast is not None else None
    if what is None:
        return {"fast_form": None}
    candidate = staged.with_name("fast.onnx")
    _save_onnx(model, candidate)
    check = verify_decoder(candidate, module, layout, new_tokens=new_tokens, atol=atol, rtol=lowering.fast_rtol,
                           reference_tokens=reference)
    out: dict[str, Any] = {"fast_form": what, "fast_verification": check.to_dict(), "kept": bool(check.ok)}
    if check.ok:
        move_onnx(candidate, staged)
        if prefill is not None:
            pm = onnx.load(str(prefill))
            lowering.fast(pm)
            _save_onnx(pm, prefill)
    return out


# --------------------------------------------------------------------------------- GenAI folder files


def genai_config(layout: DecoderLayout, filename: str = "decoder.onnx", *,
                 context_length: int | None = None, share_buffer: bool = False) -> dict[str, Any]:
    """ONNX Runtime GenAI's ``genai_config.json`` for a decoder exported by ``export_decoder``. ``share_buffer``:
    GenAI hands the decoder one cache buffer of the context length as past and present (no copy per token); only
    a graph whose every attention is GroupQueryAttention allows it (a Concat's present is past + new long)."""
    if layout.model_type not in GENAI_TYPES:
        raise ModelpressError(f"ONNX Runtime GenAI has no model type for {layout.model_type!r}",
                              f"supported here: {', '.join(sorted(GENAI_TYPES))}")
    if len(set(layout.kv_heads)) > 1 or len(set(layout.head_sizes)) > 1:
        raise ModelpressError("the layers have different key-value head counts or head sizes",
                              "ONNX Runtime GenAI needs one per model; the decoder.onnx itself still runs")
    context = int(context_length or layout.max_positions or 2048)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if layout.position_ids:
        inputs["position_ids"] = "position_ids"
    eos = layout.eos_token_id
    if not [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None and 0 <= e < layout.vocab_size]:
        raise ModelpressError(f"the model has no end-of-text token in its vocabulary (eos_token_id {eos!r}, "
                              f"vocabulary {layout.vocab_size}), which ONNX Runtime GenAI requires",
                              "set eos_token_id in the checkpoint's config.json")
    pad = layout.pad_token_id if layout.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": layout.bos_token_id if layout.bos_token_id is not None else -1,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layout.head_sizes[0],
                "hidden_size": layout.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": layout.num_heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.kv_heads[0],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES[layout.model_type],
            "vocab_size": layout.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": bool(share_buffer), "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def fused_cache(path: Path | str, layout: DecoderLayout) -> bool:
    """Whether the decoder at ``path`` updates its cache in GroupQueryAttention in every layer (the fused export),
    so its past and present may share one buffer."""
    import onnx

    path = Path(path)
    if not path.is_file():
        return False
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == layout.num_layers


def write_genai_config(folder: Path | str, layout: DecoderLayout, filename: str = "decoder.onnx", *,
                       tokenizer_dir: Path | str | None = None, tokenizer: Any = None) -> list[str]:
    """Write ``genai_config.json`` next to the decoder in ``folder`` (sharing the past and present buffers where
    the graph allows it: ``fused_cache``) and copy the checkpoint's tokenizer files (from ``tokenizer_dir``, else
    ``tokenizer.save_pretrained``); returns the names written."""
    folder = Path(folder)
    written = ["genai_config.json"]
    config = genai_config(layout, filename, share_buffer=fused_cache(folder / filename, layout))
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, folder / name)
                written.append(name)
    elif tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        with contextlib.suppress(Exception):
            written += [Path(p).name for p in tokenizer.save_pretrained(str(folder))]
    return written


def copy_decoder(src: Path | str, dst: Path | str) -> Path:
    """Copy a decoder file (with its external data, rewritten next to ``dst``) into an output folder."""
    src, dst = Path(src), Path(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".decoder-copy-"))
    try:
        staged = tmp / src.name
        shutil.copyfile(src, staged)
        from modelpress.export.files import external_data_files

        for data in external_data_files(src):
            shutil.copyfile(data, tmp / data.name)
        return move_onnx(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
