"""Structured pruning of the pretrained all-MiniLM-L6-v2: modelpress magnitude pruning vs Torch-Pruning.

Every block loses 50% of its MLP units and 25% of its attention heads (12 -> 9 heads of width 32,
1536 -> 768 MLP units; the 384-wide residual stream is kept), with no recovery training. Variants:

- ``fp32``: the original model (the baseline),
- ``modelpress_magnitude``: ``modelpress.prune.passes.MagnitudePrune`` over the ModelGraph,
- ``tp_magnitude``: Torch-Pruning's MetaPruner with MagnitudeImportance (L2), set up as its HF BERT
  example does (num_heads per q/k/v linear, prune_num_heads, no head-dim pruning), the residual stream
  left alone through ignored_layers,
- ``tp_taylor``: the same with TaylorImportance, gradients from a few calibration batches.

Each is exported the same way (``export_onnx(optimize="none")``, eager attention, opset 17, verified
against torch), all ONNX files are timed together in one interleaved run (ort-cpu, batch 1 and 8,
sequence 128; speedups are medians of per-round ratios against ``fp32``) and evaluated on the held-out
packaged sentences (cosine fidelity of mean-pooled embeddings to the FP32 model, pairwise-similarity
Spearman). Torch-Pruning's result is checked against ours: same heads / head width / MLP width per
block, parameter count within a few percent, whole heads removed consistently from q, k, v and the
output projection. Writes benchmarks/results/pruning.json and prints a table.

    python benchmarks/pruning.py              # the full run (5 rounds)
    python benchmarks/pruning.py --quick      # a smoke run (1 round, few runs)
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    console,
    minilm_path,
    parse_timing_args,
    timing_kwargs,
    timing_parser,
    timing_target,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASELINE = "fp32"
OURS = "modelpress_magnitude"
RATIOS = {"mlp": 0.5, "head": 0.25}
BATCHES, SEQ = [1, 8], 128
PARAM_TOLERANCE = 0.03  # "same structure": parameter counts within 3% (and identical widths per block)
TAYLOR_TEMPERATURE = 0.05  # in-batch contrastive loss scale 20, the loss all-MiniLM-L6-v2 was trained with

VARIANT_DESCRIPTIONS = {
    BASELINE: "the pretrained model, unpruned",
    OURS: "modelpress MagnitudePrune(ratios={'mlp': 0.5, 'head': 0.25}) over the ModelGraph "
    "(L2 norm of each unit's weight slices)",
    "tp_magnitude": "Torch-Pruning MetaPruner, MagnitudeImportance(p=2, group_reduction='mean'), "
    "pruning_ratio=0.5 (MLP), head_pruning_ratio=0.25, prune_num_heads=True, prune_head_dims=False",
    "tp_taylor": "Torch-Pruning MetaPruner, TaylorImportance(group_reduction='mean'), same ratios; "
    "gradients of an in-batch contrastive loss over the calibration sentences",
}


# ------------------------------------------------------------------------------------------- helpers


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _attention(module, implementation: str):  # noqa: ANN001, ANN202 - HF PreTrainedModel
    """Switch an HF model's attention implementation for the duration of the block."""
    before = module.config._attn_implementation
    module.set_attn_implementation(implementation)
    try:
        yield module
    finally:
        module.set_attn_implementation(before)


def count_macs(module, spec, batch: int = 1, seq: int = SEQ) -> int:  # noqa: ANN001
    """MACs of one forward pass (torch's flop counter / 2) with eager attention, as exported.

    Eager attention makes the counter see the attention score and context matmuls, which it does not
    count inside CPU scaled_dot_product_attention (so this is higher than ``graph.summary()["macs"]``).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = spec.make_torch(batch, seq)
    counter = FlopCounterMode(display=False)
    with _attention(module, "eager"), counter, torch.no_grad():
        module(**{n: inputs[n] for n in spec.names})
    return int(counter.get_total_flops() // 2)


def num_parameters(module) -> int:  # noqa: ANN001
    return sum(p.numel() for p in module.parameters())


def _source_indices(original, pruned, dim: int) -> list[int] | None:  # noqa: ANN001
    """For each slice of ``pruned`` along ``dim``, the index of the identical slice of ``original``.

    Only for the peers: Torch-Pruning keeps no record of what it kept, so it is recovered from the weights.
    Our variant's kept units come from the ModelGraph's lineage (``_lineage_indices``)."""
    o = original.detach().movedim(dim, 0).contiguous().cpu()
    p = pruned.detach().movedim(dim, 0).contiguous().cpu()
    lookup: dict[bytes, int] = {}
    for i in range(o.shape[0]):
        lookup.setdefault(o[i].numpy().tobytes(), i)
    found = [lookup.get(p[i].numpy().tobytes()) for i in range(p.shape[0])]
    return None if any(i is None for i in found) else found


def _lineage_indices(original, pruned, dim: int, claimed: list[int]) -> list[int] | None:  # noqa: ANN001
    """``claimed`` (original indices from the lineage) if ``pruned``'s slices along ``dim`` are exactly
    ``original``'s slices at those indices, else None (the lineage would be wrong)."""
    import torch

    idx = torch.as_tensor(claimed, dtype=torch.long)
    same = pruned.shape[dim] == len(claimed) and torch.equal(original.detach().index_select(dim, idx), pruned.detach())
    return claimed if same else None


def block_structure(original, pruned, lineage=None) -> list[dict[str, Any]]:  # noqa: ANN001 - HF BertModels
    """Per block: heads, head width, MLP width, which original heads/units were kept, and whether q, k, v,
    the attention output projection and the MLP's two linears agree on them (whole heads, same indices,
    the attention module's attributes matching its weights, the residual stream untouched).

    ``lineage`` (a ModelGraph's, for our variant) says which original heads and units were kept; every
    slice is then checked against the original weights. Without it (the peers) they are recovered from
    the weights."""
    rows = []
    hidden = original.config.hidden_size
    for i, (lo, lp) in enumerate(zip(original.encoder.layer, pruned.encoder.layer, strict=True)):
        so, sp = lo.attention.self, lp.attention.self
        head_dim = so.attention_head_size
        if lineage is not None:
            kept_heads = lineage[f"head:encoder.layer.{i}.attention"].tolist()
            rows_kept = [h * head_dim + d for h in kept_heads for d in range(head_dim)]
            units = lineage[f"mlp:encoder.layer.{i}"].tolist()
            pairs = [
                (so.query.weight, sp.query.weight, 0, rows_kept),
                (so.key.weight, sp.key.weight, 0, rows_kept),
                (so.value.weight, sp.value.weight, 0, rows_kept),
                (lo.attention.output.dense.weight, lp.attention.output.dense.weight, 1, rows_kept),
                (lo.intermediate.dense.weight, lp.intermediate.dense.weight, 0, units),
                (lo.output.dense.weight, lp.output.dense.weight, 1, units),
            ]
            q, k, v, o, up, down = (_lineage_indices(a, b, d, c) for a, b, d, c in pairs)
        else:
            q = _source_indices(so.query.weight, sp.query.weight, 0)
            k = _source_indices(so.key.weight, sp.key.weight, 0)
            v = _source_indices(so.value.weight, sp.value.weight, 0)
            o = _source_indices(lo.attention.output.dense.weight, lp.attention.output.dense.weight, 1)
            up = _source_indices(lo.intermediate.dense.weight, lp.intermediate.dense.weight, 0)
            down = _source_indices(lo.output.dense.weight, lp.output.dense.weight, 1)
        heads: list[int] | None = None
        whole_heads = False
        if q is not None and len(q) % head_dim == 0:
            blocks = [q[j : j + head_dim] for j in range(0, len(q), head_dim)]
            whole_heads = all(
                b == list(range(b[0], b[0] + head_dim)) and b[0] % head_dim == 0 for b in blocks
            )
            heads = sorted(b[0] // head_dim for b in blocks) if whole_heads else None
        width = sp.query.out_features
        n_heads = width // head_dim if width % head_dim == 0 else None
        checks = {
            "whole_heads": whole_heads,
            "qkv_same_heads": q is not None and q == k == v,
            "output_projection_matches": q is not None and q == o,
            "mlp_in_out_match": up is not None and up == down,
            "attributes_match_weights": (
                sp.num_attention_heads == n_heads
                and sp.all_head_size == width
                and sp.attention_head_size == head_dim
                and sp.key.out_features == width
                and sp.value.out_features == width
                and lp.attention.output.dense.in_features == width
            ),
            "residual_width_kept": (
                lp.attention.output.dense.out_features == hidden
                and lp.output.dense.out_features == hidden
                and lp.intermediate.dense.in_features == hidden
            ),
        }
        rows.append(
            {
                "block": f"encoder.layer.{i}",
                "heads": n_heads,
                "head_dim": sp.attention_head_size,
                "num_attention_heads_attr": sp.num_attention_heads,
                "all_head_size_attr": sp.all_head_size,
                "mlp": lp.intermediate.dense.out_features,
                "kept_heads": heads,
                "kept_mlp_units": None if up is None else sorted(up),
                "checks": checks,
                "consistent": all(checks.values()),
            }
        )
    return rows


def compare_structures(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Does ``peer`` have our shapes (widths per block, parameters within PARAM_TOLERANCE), and how many
    of the heads / MLP units it kept are the ones we kept."""
    per_block = []
    same_widths = True
    for a, b in zip(ours["blocks"], peer["blocks"], strict=True):
        same = (a["heads"], a["head_dim"], a["mlp"]) == (b["heads"], b["head_dim"], b["mlp"])
        same_widths = same_widths and same
        shared_heads = (
            len(set(a["kept_heads"]) & set(b["kept_heads"])) if a["kept_heads"] and b["kept_heads"] else None
        )
        shared_units = (
            len(set(a["kept_mlp_units"]) & set(b["kept_mlp_units"]))
            if a["kept_mlp_units"] and b["kept_mlp_units"]
            else None
        )
        per_block.append(
            {
                "block": a["block"],
                "same_widths": same,
                "kept_heads_shared_with_ours": shared_heads,
                "kept_mlp_units_shared_with_ours": shared_units,
            }
        )
    rel = abs(peer["parameters"] - ours["parameters"]) / ours["parameters"]
    return {
        "same_widths_every_block": same_widths,
        "parameters_relative_difference": rel,
        "parameters_within_tolerance": rel <= PARAM_TOLERANCE,
        "tolerance": PARAM_TOLERANCE,
        "all_blocks_consistent": all(r["consistent"] for r in peer["blocks"]),
        "matches_ours": same_widths
        and rel <= PARAM_TOLERANCE
        and all(r["consistent"] for r in peer["blocks"]),
        "per_block": per_block,
    }


# ------------------------------------------------------------------------------------- Torch-Pruning


def _contrastive_loss(module, batch: dict, temperature: float = TAYLOR_TEMPERATURE):  # noqa: ANN001, ANN202
    """In-batch contrastive loss on mean-pooled, normalized embeddings (each sentence its own positive,
    the others negatives): a label-free objective for Taylor importance on an embedding model."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    out = module(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)
    logits = emb @ emb.T / temperature
    return F.cross_entropy(logits, torch.arange(emb.shape[0]))


def torch_pruning_prune(original, spec, importance: str, calibration=None) -> dict[str, Any]:  # noqa: ANN001
    """Prune a copy of ``original`` (an HF BertModel) with Torch-Pruning 1.6 at RATIOS, per block.

    Set up like Torch-Pruning's examples/transformers/prune_hf_bert.py: ``num_heads`` for every q/k/v
    linear, ``prune_num_heads=True`` with ``head_pruning_ratio``, ``prune_head_dims=False``; unlike the
    example (which also prunes the hidden size), the residual stream is kept by ignoring the layers that
    write it (embeddings, attention output and MLP output projections, pooler), and the ratio is uniform
    per block (``global_pruning=False``). The attention modules' num_attention_heads / all_head_size are
    updated afterwards, as in the example.
    """
    import torch
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(original).eval()
    model.set_attn_implementation("eager")  # trace plain matmuls through the heads (autograd graph)
    example = {n: t for n, t in spec.make_torch(2, 16).items() if n in spec.names}
    num_heads: dict[torch.nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for linear in (m.query, m.key, m.value):
                num_heads[linear] = m.num_attention_heads
    ignored = [model.embeddings, model.pooler]
    for layer in model.encoder.layer:
        ignored += [layer.attention.output.dense, layer.output.dense]

    started = time.perf_counter()
    calibration_batches = 0
    if importance == "magnitude":
        imp = tp.importance.MagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        imp = tp.importance.TaylorImportance(group_reduction="mean")
    else:
        raise ValueError(f"unknown importance {importance!r}")
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        global_pruning=False,
        importance=imp,
        iterative_steps=1,
        pruning_ratio=RATIOS["mlp"],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=RATIOS["head"],
        output_transform=lambda out: out.last_hidden_state.sum(),
        ignored_layers=ignored,
    )
    if importance == "taylor":
        if calibration is None:
            raise ValueError("Taylor importance needs calibration batches")
        model.zero_grad(set_to_none=True)
        for batch in calibration.batches:
            loss = _contrastive_loss(model, {n: batch[n] for n in spec.names if n in batch})
            loss.backward()
            calibration_batches += 1
    groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        groups += 1
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - started
    model.set_attn_implementation(original.config._attn_implementation)
    return {
        "module": model,
        "seconds": seconds,
        "pruned_groups": groups,
        "calibration_batches": calibration_batches,
        "config_num_attention_heads": model.config.num_attention_heads,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__, RESULTS / "pruning.json")
    parser.add_argument("--no-taylor", action="store_true", help="skip Torch-Pruning with TaylorImportance")
    args = parse_timing_args(parser, argv)

    import modelpress
    from modelpress.bench import measure, system_info, write_json_atomic
    from modelpress.compress import Context
    from modelpress.data import EmbeddingTask, load_data, onnx_runner, torch_runner
    from modelpress.export import export_onnx
    from modelpress.progress import Reporter
    from modelpress.prune.passes import MagnitudePrune

    con = console()
    reporter = Reporter()
    started = time.perf_counter()
    target = timing_target(args)

    with reporter.step("loading all-MiniLM-L6-v2"):
        original = modelpress.load(str(minilm_path()))
    spec = original.input_spec
    names = list(spec.names)
    data = load_data(None, spec, original.tokenizer)
    task = EmbeddingTask()
    with reporter.step("reference embeddings (torch FP32)"):
        reference = task.reference_cache(torch_runner(original.module, names), data.evaluation)

    modules: dict[str, Any] = {BASELINE: original.module}
    info: dict[str, dict[str, Any]] = {
        BASELINE: {"status": "ok", "macs_graph_summary": original.summary()["macs"]},
    }

    with tempfile.TemporaryDirectory(prefix="modelpress-pruning-") as tmp:
        tmpdir = Path(tmp)

        with reporter.step("modelpress magnitude pruning"):
            t0 = time.perf_counter()
            result = MagnitudePrune({"ratios": dict(RATIOS)}).apply(original, Context(workdir=tmpdir / "ctx"))
            seconds = time.perf_counter() - t0
        ours_graph = result.graph
        modules[OURS] = ours_graph.module
        info[OURS] = {
            "status": "ok",
            "prune_seconds": round(seconds, 2),
            "macs_graph_summary": ours_graph.summary()["macs"],
            "config_num_attention_heads": ours_graph.module.config.num_attention_heads,
        }

        peers = [("tp_magnitude", "magnitude")]
        if args.no_taylor:
            info["tp_taylor"] = {"status": "skipped", "reason": "--no-taylor"}
        else:
            peers.append(("tp_taylor", "taylor"))
        for name, importance in peers:
            try:
                with reporter.step(f"Torch-Pruning ({importance})"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = torch_pruning_prune(original.module, spec, importance, data.calibration)
                modules[name] = out.pop("module")
                prune_seconds = round(out.pop("seconds"), 2)
                info[name] = {"status": "ok", "prune_seconds": prune_seconds, **out}
            except Exception as exc:  # record why, keep measuring the rest
                info[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                reporter.log(f"[yellow]Torch-Pruning ({importance}) failed:[/yellow] {exc}")

        paths: dict[str, Path] = {}
        for name, module in modules.items():
            entry = info[name]
            entry["description"] = VARIANT_DESCRIPTIONS[name]
            entry["parameters"] = num_parameters(module)
            entry["macs"] = count_macs(module, spec)
            entry["blocks"] = block_structure(original.module, module, ours_graph.lineage if name == OURS else None)
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    exported = export_onnx(
                        module, spec, tmpdir / name / "model.onnx", optimize="none", reporter=reporter
                    )
            except Exception as exc:
                if name in (BASELINE, OURS):
                    raise
                entry.update(status="failed", reason=f"export: {type(exc).__name__}: {exc}")
                reporter.log(f"[yellow]{name}: export failed:[/yellow] {exc}")
                continue
            paths[name] = exported.path
            entry["file_size_bytes"] = exported.file_size_bytes
            entry["export"] = {
                "optimization": exported.optimization,
                "opset": exported.opset,
                "attn_implementation": exported.attn_implementation,
                "seconds": round(exported.export_seconds, 2),
                "verification": None if exported.verification is None else vars(exported.verification),
            }
            with reporter.step(f"fidelity of {name}"):
                entry["fidelity"] = task.evaluate(
                    onnx_runner(exported.path, target.threads),
                    None,
                    data.evaluation,
                    reference_outputs=reference,
                )

        ours_info = info[OURS]
        for name in ("tp_magnitude", "tp_taylor"):
            if info.get(name, {}).get("status") == "ok":
                info[name]["structure_vs_ours"] = compare_structures(ours_info, info[name])

        report = measure(
            paths,
            spec,
            target,
            **timing_kwargs(args),
            max_time_s=30.0,
            baseline=BASELINE,
            batch_sizes=BATCHES,
            seq_lens=[SEQ],
            reporter=reporter,
        )
        for name, variant in report.variants.items():
            if variant.path:
                variant.path = f"{name}/{Path(variant.path).name}"
            info[name]["speedup"] = {str(b): report.stats(name, b, SEQ).speedup for b in BATCHES}
            info[name]["median_ms"] = {str(b): report.stats(name, b, SEQ).median_ms for b in BATCHES}

    system = system_info(target.threads)
    versions = {
        **system["versions"],
        "torch-pruning": _version("torch-pruning"),
        "modelpress": _version("modelpress"),
    }
    result_json = {
        "benchmark": "pruning",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, FP32, 6 blocks x 12 heads x 32, MLP 1536), "
        "output last_hidden_state",
        "pruning": {
            "ratios": RATIOS,
            "scope": "every block, uniform; residual stream (384) kept; no recovery training",
            "taylor_loss": f"in-batch contrastive loss on mean-pooled normalized embeddings, temperature "
            f"{TAYLOR_TEMPERATURE}, over the {len(data.calibration)} calibration sentences",
        },
        "protocol": (
            f"all variants exported the same way (modelpress export_onnx optimize='none', eager attention, "
            f"opset 17, verified against torch), then timed together in one interleaved run on "
            f"{target.name} ({target.threads} threads): round-robin over variants with fresh sessions each "
            f"round, {args.rounds} rounds, warm-up, >= {args.runs} runs and >= {args.min_time}s per variant, "
            f"shape and round; speedup = median over rounds of baseline ms / variant ms; batch "
            f"{' and '.join(map(str, BATCHES))}, sequence {SEQ}. Fidelity: mean (min) cosine of mean-pooled "
            f"ONNX embeddings to the FP32 torch model's on {len(data.evaluation)} held-out sentences, and "
            f"Spearman of all pairwise similarities. MACs: torch flop counter / 2, batch 1, sequence {SEQ}, "
            f"eager attention."
        ),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": system,
        "versions": versions,
        "target": report.target,
        "shapes": {"batch_sizes": BATCHES, "seq_len": SEQ},
        "baseline": BASELINE,
        "data": data.description,
        "variants": info,
        "measurement": report.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_json_atomic(args.out, result_json)

    con.print(
        report.to_table(title=f"MiniLM pruning on {target.name}, {target.threads} threads, sequence {SEQ}")
    )
    con.print(summary_table(info))
    for name in ("tp_magnitude", "tp_taylor"):
        cmp = info.get(name, {}).get("structure_vs_ours")
        if cmp:
            con.print(
                f"{name}: matches our structure: {cmp['matches_ours']} (same widths every block: "
                f"{cmp['same_widths_every_block']}, params differ by {cmp['parameters_relative_difference']:.2%}, "
                f"heads/units consistent: {cmp['all_blocks_consistent']})"
            )
        elif name in info and info[name].get("status") != "ok":
            con.print(f"{name}: {info[name]['status']} ({info[name].get('reason', '')})")
    con.print(f"wrote {out}")
    return 0


def summary_table(info: dict[str, dict[str, Any]]):  # noqa: ANN201 - rich.table.Table
    from rich.table import Table

    table = Table(title="MiniLM: 50% MLP units, 25% heads per block, no recovery training")
    for col in (
        "variant",
        "params M",
        "MACs M",
        "heads x dim / MLP",
        "file MB",
        "speedup b1",
        "speedup b8",
        "fidelity mean (min)",
        "spearman",
        "prune s",
    ):
        table.add_column(col, justify="left" if col == "variant" else "right")

    def fmt(x, spec: str) -> str:  # noqa: ANN001
        return "-" if x is None else format(x, spec)

    for name, e in info.items():
        if e.get("status") != "ok":
            table.add_row(name, *["-"] * 9)
            continue
        widths = {(b["heads"], b["head_dim"], b["mlp"]) for b in e.get("blocks", [])}
        shape = "{} x {} / {}".format(*next(iter(widths))) if len(widths) == 1 else "non-uniform"
        fid = e.get("fidelity") or {}
        speed = e.get("speedup") or {}
        size = e.get("file_size_bytes")
        table.add_row(
            name,
            fmt(e["parameters"] / 1e6, ".2f"),
            fmt(e["macs"] / 1e6, ".0f"),
            shape,
            fmt(None if size is None else size / 1e6, ".1f"),
            fmt(speed.get("1"), ".2f") + ("x" if speed.get("1") else ""),
            fmt(speed.get("8"), ".2f") + ("x" if speed.get("8") else ""),
            "-" if not fid else f"{fid['fidelity_mean']:.3f} ({fid['fidelity_min']:.3f})",
            fmt(fid.get("spearman"), ".3f"),
            fmt(e.get("prune_seconds"), ".1f"),
        )
    return table


if __name__ == "__main__":
    raise SystemExit(main())
