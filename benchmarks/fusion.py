"""Optimal-transport fusion of small ViTs (issue 10): OT fusion against vanilla averaging, the parents and
their ensemble, one-shot and after the same short recovery; heterogeneous fusion into half the MLP width
against the same small architecture trained from scratch and a magnitude-pruned parent, same steps.

Settings:

- ``seeds``: digits ViTs of the zoo (``modelpress.train.zoo.digits_vit``, seeds 0..N-1, trained by our own
  loop on scikit-learn digits, cached), fused into seed 0's units;
- ``split``: a harder one: two ViTs of the zoo's architecture trained by the benchmark for ``--split-steps``
  steps on disjoint halves of the classes (0-4 and 5-9; the loss sees all ten logits), so neither parent
  knows the other's digits and the fused model must hold both.

Every fused variant (alignment hard|soft x cost weights|acts x QK mode separate|shared|per-head), vanilla
averaging, the scratch model and the pruned parent get the same recovery: ``--recover-steps`` of label-free
distillation from the parents' ensemble (batch 64, lr 5e-4), on the digits train part. Accuracy on the 359
held-out digits. Writes benchmarks/results/fusion.json and prints a table.

    python benchmarks/fusion.py                 # about 10 minutes on 2 busy cores
    python benchmarks/fusion.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, console, dist_version, quiet  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2


def _context(graph, tmp: Path, seed: int):  # noqa: ANN001, ANN202
    from modelpress.data import infer_task, load_data
    from modelpress.passes import Context

    data = load_data("digits", graph.input_spec, None, batch_size=64, n_calibration=200, n_evaluation=None,
                     seed=seed)
    ctx = Context(workdir=tmp, task=infer_task(graph.input_spec, graph.module), data=data, reference=graph,
                  seed=seed)
    return ctx


def _acc(ctx, graph) -> float:  # noqa: ANN001
    from modelpress.fuse.passes import quality

    return quality(ctx, graph)["accuracy"]


def _split_parents(steps: int, seed: int) -> list:
    """Two ViTs of the zoo's architecture trained on classes 0-4 and 5-9 (labels, one-cycle, ``steps``)."""
    import numpy as np
    import torch
    from transformers import ViTForImageClassification

    from modelpress.data.digits import digits_split
    from modelpress.data.sources import DataSplit
    from modelpress.data.tasks import ClassificationTask
    from modelpress.graph import ModelGraph
    from modelpress.models.loaders import hf_input_spec
    from modelpress.train import TrainConfig, train
    from modelpress.train.zoo import _vit_config

    x, y, _, _ = digits_split()
    out = []
    for i, classes in enumerate((range(0, 5), range(5, 10))):
        keep = np.isin(y, list(classes))
        split = DataSplit([{"pixel_values": torch.from_numpy(x[keep])}], [torch.from_numpy(y[keep])])
        torch.manual_seed(seed + 100 + i)
        model = ViTForImageClassification(_vit_config())
        config = TrainConfig(steps=steps, lr=3e-3, weight_decay=0.05, schedule="one_cycle", warmup_steps=steps // 10,
                             grad_clip=None, batch_size=64, seed=seed + i, label_weight=1.0, label_smoothing=0.1)
        train(model, split, task=ClassificationTask(), config=config, input_names=["pixel_values"])
        spec = hf_input_spec(model)
        spec.shape = (1, 8, 8)
        source = {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()}
        out.append(ModelGraph(model.eval(), spec, source, name=f"classes{classes.start}-{classes.stop - 1}"))
    return out


def recover(graph, teacher, ctx, steps: int, lr: float, batch_size: int) -> tuple[Any, Any]:  # noqa: ANN001
    """A recovered copy of ``graph`` (distilled from ``teacher`` by the Context's service) and its summary."""
    student = graph.copy()
    return student, ctx.recover(student, steps=steps, lr=lr, teacher=teacher, batch_size=batch_size)


def run_setting(name: str, parents: list, args, tmp: Path, reporter, grid: list[tuple]) -> dict[str, Any]:  # noqa: ANN001
    from modelpress.fuse import FusionSettings, fuse
    from modelpress.fuse.passes import ensemble_graph

    ctx = _context(parents[0], tmp / name, args.seed)
    batches = [{k: v for k, v in b.items()} for b in ctx.calibration.batches]
    steps = args.recover_steps
    rows: dict[str, Any] = {"parents": {p.name: _acc(ctx, p) for p in parents}}
    first = None
    variants: dict[str, Any] = {}
    for alignment, cost, qk in grid:
        key = f"ot {alignment} {cost} {qk}"
        t0 = time.perf_counter()
        with reporter.step(f"{name}: {key}"), quiet():
            f = fuse(parents, FusionSettings(alignment=alignment, cost=cost, qk=qk, samples=200), batches,
                     seed=args.seed)
            first = first or f
            teacher = ensemble_graph(parents, f, ctx)
            one = _acc(ctx, f.graph)
            rec, info = recover(f.graph, teacher, ctx, steps, 5e-4, 64)
        variants[key] = {"one_shot": one, "recovered": _acc(ctx, rec), "fusion_seconds": round(f.seconds, 1),
                         "seconds": round(time.perf_counter() - t0, 1)}
        reporter.log(f"  {key}: {one:.3f} -> {variants[key]['recovered']:.3f}")
    teacher = ensemble_graph(parents, first, ctx)
    rows["ensemble"] = _acc(ctx, teacher)
    with reporter.step(f"{name}: vanilla averaging"), quiet():
        rec, _ = recover(first.vanilla, teacher, ctx, steps, 5e-4, 64)
    rows["vanilla"] = {"one_shot": _acc(ctx, first.vanilla), "recovered": _acc(ctx, rec)}
    rows["ot"] = variants
    if args.hetero:
        rows["half_mlp"] = _heterogeneous(parents, ctx, batches, teacher, args, reporter, name)
    best_parent = max(rows["parents"].values())
    best_one = max(v["one_shot"] for v in variants.values())
    best_rec = max(v["recovered"] for v in variants.values())
    rows["checks"] = {
        "best_ot_one_shot": best_one, "vanilla_one_shot": rows["vanilla"]["one_shot"],
        "ot_one_shot_minus_vanilla": round(best_one - rows["vanilla"]["one_shot"], 4),
        "best_parent": best_parent, "best_ot_recovered": best_rec,
        "ot_recovered_at_least_best_parent": best_rec >= best_parent,
        "ot_variants_recovered_at_least_best_parent": sum(v["recovered"] >= best_parent for v in variants.values()),
        "ot_variants": len(variants),
    }
    return rows


def _heterogeneous(parents: list, ctx, batches, teacher, args, reporter, name: str) -> dict[str, Any]:  # noqa: ANN001
    """Fusion into half the MLP width vs the half-width architecture from scratch and a magnitude-pruned parent."""
    import torch

    from modelpress.fuse import FusionSettings, fuse
    from modelpress.graph import ModelGraph
    from modelpress.passes import registered_passes

    steps = args.recover_steps
    out: dict[str, Any] = {}
    with reporter.step(f"{name}: fusion into half the MLP width"), quiet():
        f = fuse(parents, FusionSettings(alignment="hard", cost="acts", qk="per-head", width={"mlp": 0.5}),
                 batches, seed=args.seed)
        rec, _ = recover(f.graph, teacher, ctx, steps, 5e-4, 64)
    out["ot_fusion"] = {"params": f.graph.num_parameters(), "one_shot": _acc(ctx, f.graph), "recovered": _acc(ctx, rec)}
    with reporter.step(f"{name}: magnitude-pruned parent (half MLP)"), quiet():
        pruned = registered_passes()["prune.magnitude"]({"ratios": {"mlp": 0.5}}).apply(parents[0], ctx).graph
        rec, _ = recover(pruned, teacher, ctx, steps, 5e-4, 64)
    out["magnitude_pruned_parent"] = {"params": pruned.num_parameters(), "one_shot": _acc(ctx, pruned),
                                      "recovered": _acc(ctx, rec)}
    with reporter.step(f"{name}: the half-MLP architecture from scratch"), quiet():
        torch.manual_seed(args.seed)
        module = type(f.graph.module)(f.graph.module.config).eval()
        scratch = ModelGraph(module, f.graph.input_spec, f.graph.source, name="scratch")
        rec, _ = recover(scratch, teacher, ctx, steps, 5e-4, 64)
    out["scratch"] = {"params": scratch.num_parameters(), "one_shot": _acc(ctx, scratch), "recovered": _acc(ctx, rec)}
    return out


def print_table(con, results: dict) -> None:  # noqa: ANN001
    from rich.table import Table

    for name, r in results.items():
        t = Table(title=f"{name}: held-out accuracy, one-shot -> after {r.get('recover_steps')} recovery steps")
        for col in ("model", "one-shot", "recovered"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for p, a in r["parents"].items():
            t.add_row(f"parent {p}", f"{a:.3f}", "-")
        t.add_row("ensemble", f"{r['ensemble']:.3f}", "-")
        t.add_row("vanilla averaging", f"{r['vanilla']['one_shot']:.3f}", f"{r['vanilla']['recovered']:.3f}")
        for k, v in r["ot"].items():
            t.add_row(k, f"{v['one_shot']:.3f}", f"{v['recovered']:.3f}")
        for k, v in r.get("half_mlp", {}).items():
            t.add_row(f"half MLP: {k} ({v['params']:,} params)", f"{v['one_shot']:.3f}", f"{v['recovered']:.3f}")
        con.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "fusion.json")
    parser.add_argument("--models", type=int, default=2, help="zoo ViTs to fuse in the seeds setting (2-4)")
    parser.add_argument("--recover-steps", type=int, default=150)
    parser.add_argument("--split-steps", type=int, default=300, help="training steps of each class-subset parent")
    parser.add_argument("--settings", default="seeds,split")
    parser.add_argument("--no-hetero", dest="hetero", action="store_false")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.recover_steps, args.split_steps = 10, 60
    import torch

    from modelpress.bench import system_info, write_json_atomic
    from modelpress.progress import Reporter
    from modelpress.system import load_average

    torch.set_num_threads(1)
    con, reporter = console(), Reporter()
    full = list(itertools.product(("hard", "soft"), ("weights", "acts"), ("separate", "shared", "per-head")))
    small = [("hard", "weights", "per-head"), ("hard", "acts", "per-head"), ("soft", "acts", "per-head"),
             ("hard", "acts", "shared")]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="modelpress-fusion-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for setting in args.settings.split(","):
            t0 = time.perf_counter()
            if setting == "seeds":
                import modelpress
                from modelpress.train.zoo import digits_vit

                with reporter.step(f"{args.models} digits ViTs from the zoo"), quiet():
                    parents = []
                    for s in range(args.models):
                        g = modelpress.load(str(digits_vit(seed=s).path))
                        g.name = f"seed{s}"
                        parents.append(g)
                rows = run_setting(setting, parents, args, Path(tmp), reporter, small if args.quick else full)
            else:
                with reporter.step(f"two ViTs on disjoint class halves ({args.split_steps} steps each)"), quiet():
                    parents = _split_parents(args.split_steps, args.seed)
                rows = run_setting(setting, parents, args, Path(tmp), reporter, small)
            rows["recover_steps"] = args.recover_steps
            rows["seconds"] = round(time.perf_counter() - t0, 1)
            results[setting] = rows
    out = {
        "benchmark": "fusion",
        "command": "python benchmarks/fusion.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": system_info(THREADS),
        "versions": {"modelpress": dist_version("modelpress"), "pot": dist_version("pot"),
                     "torch": dist_version("torch")},
        "load_average": {"before": load_before, "after": load_average()},
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    path = write_json_atomic(args.out, out)
    print_table(con, results)
    con.print(f"wrote {path} in {out['seconds']:.0f} s")
    print(json.dumps({k: v.get("checks") for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
