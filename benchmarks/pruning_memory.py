"""Peak memory of global pruning (``modelpress prune --target-params``): random-weight BERT-base, and with
``--llama-1b`` a random-weight ~1B-parameter Llama-style LM, pruned to 0.6 of their parameters with Hessian
saliency through the CLI's own pieces (``load_data`` on a ``tensors:FILE.npz``, the CLI's Context, the
recipe ``modelpress prune`` builds, the ``prune.global`` pass applied as the Pipeline applies it, with the
original as ``ctx.reference``). ONNX export and the report, which follow the pass in the CLI, are not run.

Each case runs in its own process; the result is its peak resident set (``VmHWM``, checked against the
parent's ``RUSAGE_CHILDREN`` ``ru_maxrss``) over the FP32 weight bytes, the resident set after the model
is built (imports + weights: the floor), the peak per phase (sampled every 20 ms, phases named by the
reporter's steps), and the wall time (indicative only: the machine is shared). Weights are random (no
download); calibration tokens are random ids.

    python benchmarks/pruning_memory.py                  # BERT-base (writes results/pruning_memory.json)
    python benchmarks/pruning_memory.py --llama-1b       # and the 1B case (4 sequences of 32 tokens)
    python benchmarks/pruning_memory.py --cli bert-base-prune bert-base-compress   # the CLI end to end

``--cli`` runs ``modelpress prune`` / ``compress`` itself (export, evaluation and latency included) on a random-weight
HF folder saved by another process, with the resident set named by the reporter's steps (``stages``, and
``stages_where_the_peak_rose_bytes``; ``stage_summary``: seconds and peak resident set per stage name):
issue 20's and 22's goals (peak <= 3x the FP32 weights) are stated for the command. Cases: ``bert-base-prune``
(goal a), ``bert-base-compress`` (b, the default recipe), ``llama-1b-int4`` (c, ``--recipe int4-weight-only``;
``llama-1b-int4-rtn`` the same recipe with round to nearest: its memory path in minutes rather than hours),
``llama-1b-prune`` (issue 20's 1B case). The command's own process is what the goals measure; the processes it
starts (export candidate builders, the latency runner's memory probes) run one at a time beside it, and their
largest peak is reported as ``children_peak_rss_bytes``. A case is stopped (and reported as such) when the
machine's available memory falls under ``--min-free-gib`` (default 4: the machine is shared).

BERT-base is calibrated on 128 sequences of 64 tokens in batches of 16 (the CLI's sample count and batch
size); one pruning iteration by default (``--iterations``; the CLI's default is 4, which repeats the same
steps on smaller models). ``--case NAME`` runs one case in this process and prints its row.

Run with ``PYTHONPATH`` pointing at another checkout's ``src`` to measure that code (the "before" column).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    # 16 samples of 64 tokens, one batch: the refit (on by default) reruns both models' forwards up to each refit
    # layer, so its time grows with batches x depth^2 (25 min at 4 batches on the loaded 2 cores); memory does not
    "bert-base": {"arch": "bert", "samples": 16, "seq": 64, "batch": 16},
    # 4 sequences of 32 tokens: one batch (the CPU time of a 1B backward and of the refit's partial forwards, one
    # pair per refit stage, on two shared cores)
    "llama-1b": {"arch": "llama", "samples": 4, "seq": 32, "batch": 16,
                 "config": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16,
                            "num_attention_heads": 16, "num_key_value_heads": 16}},
    # the same shape at 1/8 of the parameters: a quick look at where the 1B case's memory goes
    "llama-small": {"arch": "llama", "samples": 8, "seq": 64, "batch": 16,
                    "config": {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 8,
                               "num_attention_heads": 8, "num_key_value_heads": 8}},
}


# the CLI end to end (`modelpress prune` / `compress` on a random-weight HF folder and a tensors: file): the
# goals of issues 20 and 22 (peak <= 3x the FP32 weights); one pruning iteration, few calibration samples (the
# refit streams them: the sample count moves time, not the peak)
CLI_CASES = {
    "bert-base-prune": {"arch": "bert", "samples": 64, "seq": 64, "goal": "a",
                        "args": ["prune", "--target-params", "0.6", "--saliency", "hessian", "--iterations", "1"]},
    "llama-1b-prune": {"arch": "llama", "samples": 16, "seq": 32, "config": CASES["llama-1b"]["config"],
                       "args": ["prune", "--target-params", "0.6", "--saliency", "hessian", "--iterations", "1"]},
    "bert-base-compress": {"arch": "bert", "samples": 64, "seq": 64, "goal": "b", "args": ["compress"]},
    "llama-1b-int4": {"arch": "llama", "samples": 16, "seq": 32, "config": CASES["llama-1b"]["config"], "goal": "c",
                      "args": ["compress", "--recipe", "int4-weight-only"]},
    # the same recipe with round to nearest instead of GPTQ: the memory path without GPTQ's hours of CPU on two
    # cores (GPTQ adds one block's Hessians, about 0.1x of the 1B weights)
    "llama-1b-int4-rtn": {"arch": "llama", "samples": 16, "seq": 32, "config": CASES["llama-1b"]["config"], "goal": "c",
                          "args": ["compress"], "recipe": {"base": "int4-weight-only", "method": "rtn"}},
}


def _status(field: str, pid: int | str = "self") -> int:
    """A /proc/PID/status memory field in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children_rss() -> int:
    """The summed resident sets of this process's live children (the export candidates' builders)."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                total += sum(_status("VmRSS", pid) for pid in fh.read().split())
        except OSError:
            continue
    return total


class _Sampler:
    """Samples VmRSS every ``period`` seconds; keeps the peak per phase and a timeline of phase spans
    (phase, resident set at entry, peak during the span), since a phase's peak alone also counts memory an
    earlier phase left resident."""

    def __init__(self, period: float = 0.02, verbose: bool = True) -> None:
        self.phase = "start"
        self.verbose, self.t0 = verbose, time.perf_counter()
        self.peaks: dict[str, int] = {}
        self.tree_peak = 0  # this process and its live children together, sampled at the same instant
        self.spans: list[list] = [["start", 0, 0]]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(period)

    def sample(self) -> int:
        rss = _status("VmRSS")
        tree = rss + _children_rss()
        with self._lock:
            self.tree_peak = max(self.tree_peak, tree)
            if rss > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = rss
            self.spans[-1][2] = max(self.spans[-1][2], rss)
        return rss

    def set(self, phase: str) -> None:
        self.sample()
        with self._lock:
            changed, self.phase = phase != self.phase, phase
        rss = self.sample()
        if changed and self.verbose:  # progress on stderr (the child's stdout carries its result)
            print(f"[{time.perf_counter() - self.t0:8.1f} s] {phase}: RSS {rss / 2**20:.0f} MiB", file=sys.stderr,
                  flush=True)
        with self._lock:
            if self.spans[-1][0] == phase and self.spans[-1][2] <= rss:
                return
            self.spans.append([phase, rss, rss])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def top_spans(self, n: int = 8) -> list[dict]:
        """The ``n`` spans that grew the resident set most above its value at their entry."""
        grown = sorted(self.spans, key=lambda s: s[2] - s[1], reverse=True)[:n]
        return [{"phase": p, "rss_at_entry": a, "peak": b, "growth": b - a} for p, a, b in grown]


def _model(arch: str, sizes: dict | None = None):  # noqa: ANN202 - an nn.Module
    import torch
    import transformers

    torch.manual_seed(0)
    if arch == "bert":
        config = transformers.BertConfig(architectures=["BertModel"])
        return transformers.BertModel(config).eval()
    config = transformers.LlamaConfig(
        **(sizes or {}), vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    return transformers.LlamaForCausalLM(config).eval()


def _instrument(sampler: _Sampler) -> None:
    """Name the sampler's phases after the prune pass's big steps (copies, tracing, scoring, removal) by
    wrapping them (measurement only: the wrapped functions run unchanged)."""
    import functools

    from modelpress.graph import ModelGraph
    from modelpress.prune import global_

    def wrap(owner: object, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            before = sampler.phase
            sampler.set(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                sampler.set(before)

        setattr(owner, attr, wrapped)

    wrap(ModelGraph, "copy", "graph.copy")
    wrap(ModelGraph, "remove_many", "remove units")
    wrap(ModelGraph, "remove_blocks", "remove blocks")
    wrap(global_, "group_saliency", "saliency")
    wrap(global_, "Costs", "costs")


def run_case(name: str, iterations: int) -> dict:
    """One case in this process (called in a child): build, load calibration data as the CLI does, prune."""
    sampler = _Sampler()
    t0 = time.perf_counter()
    sampler.set("imports")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from modelpress.bench import get_target
    from modelpress.compress.recipe import Recipe
    from modelpress.data import infer_task, load_data
    from modelpress.graph import ModelGraph
    from modelpress.models.loaders import _without_cache, hf_input_spec
    from modelpress.passes import Context
    from modelpress.progress import Reporter

    spec = CASES[name]
    sampler.set("build")
    module = _without_cache(_model(spec["arch"], spec.get("config")))
    params = sum(p.numel() for p in module.parameters())
    graph = ModelGraph(module, hf_input_spec(module), {"kind": "hf", "class": type(module).__name__,
                                                       "config": module.config.to_dict()}, name=name)
    built_rss = _status("VmRSS")
    sampler.set("data")

    class PhaseReporter(Reporter):
        """Quiet; names the sampler's phase after the step or loop running."""

        def __init__(self) -> None:
            super().__init__(quiet=True)

        def track(self, items, description, total=None):  # noqa: ANN001, ANN202
            sampler.set(description)
            yield from items
            sampler.set("pruning")

        def step(self, description):  # noqa: ANN001, ANN202
            sampler.set(description)
            return super().step(description)

        def log(self, message: str) -> None:
            sampler.set("pruning")

    _instrument(sampler)
    with tempfile.TemporaryDirectory(prefix="sal-prune-mem-") as tmp:
        rng = np.random.default_rng(0)
        n = spec["samples"] + 2  # two evaluation samples (load_data splits calibration / evaluation)
        ids = rng.integers(1000, graph.input_spec.vocab_size or 30000, (n, spec["seq"]))
        arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in graph.input_spec.names:
            arrays["token_type_ids"] = np.zeros_like(ids)
        np.savez(Path(tmp) / "data.npz", **arrays)
        data = load_data(f"tensors:{tmp}/data.npz", graph.input_spec, None, seed=0, n_calibration=spec["samples"],
                         n_evaluation=2, batch_size=spec["batch"])
        rep = PhaseReporter()
        ctx = Context(workdir=Path(tmp) / "work", task=infer_task(graph.input_spec, graph.module), data=data,
                      target=get_target("ort-cpu", threads=None), seed=0, reporter=rep,
                      checkpoints=Path(tmp) / "checkpoints")
        ctx.reference = graph  # as the Pipeline does
        # the recipe `modelpress prune --target-params 0.6 --iterations N` builds
        recipe = Recipe.from_dict({"name": "prune-global", "passes": [
            {"pass": "prune.global", "saliency": "hessian", "target": "params", "ratio": 0.6,
             "iterations": iterations}]}, "benchmark")
        the_pass = recipe.passes[0]
        sampler.set("pruning")
        t1 = time.perf_counter()
        result = the_pass.apply(graph, ctx)
        t2 = time.perf_counter()
    sampler.stop()
    weights = 4 * params
    peak = _status("VmHWM")
    return {
        "case": name, "params": params, "fp32_weight_bytes": weights,
        "calibration": {"samples": spec["samples"], "seq": spec["seq"], "batch": spec["batch"],
                        "batches": len(data.calibration.batches)},
        "iterations": iterations,
        "params_after": result.graph.num_parameters(),
        "ratio_reached": result.metrics.get("ratio_reached"),
        "peak_rss_bytes": peak, "peak_over_fp32_weights": round(peak / weights, 2),
        "rss_after_build_bytes": built_rss, "rss_after_build_over_fp32_weights": round(built_rss / weights, 2),
        "peak_rss_by_phase_bytes": sampler.peaks,
        "largest_growth_spans": sampler.top_spans(),
        "seconds_pruning": round(t2 - t1, 1), "seconds_total": round(t2 - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }


def _stage_names(sampler: _Sampler, stages: list) -> None:
    """Name the sampler's phases after the CLI's reporter steps and loops (wrapped at the class: measurement
    only, the steps run unchanged), logging (seconds, stage, resident set at entry) to ``stages``."""
    import contextlib

    from modelpress import progress

    t0 = time.perf_counter()
    step, track = progress.Reporter.step, progress.Reporter.track

    def mark(name: str) -> None:
        sampler.set(name)
        stages.append([round(time.perf_counter() - t0, 1), name, _status("VmRSS"), _status("VmHWM"),
                       _status("RssFile")])

    @contextlib.contextmanager
    def stepping(self, description):  # noqa: ANN001, ANN202
        before = sampler.phase
        mark(description)
        try:
            with step(self, description):
                yield
        finally:
            mark(before)

    def tracking(self, items, description, total=None):  # noqa: ANN001, ANN202
        before = sampler.phase
        mark(description)
        yield from track(self, items, description, total)
        mark(before)

    progress.Reporter.step = stepping
    progress.Reporter.track = tracking


def _save_hf(spec: dict, folder: Path) -> tuple[int, Path]:
    """Save the case's random-weight model as an HF folder and its random calibration tokens beside it (in a
    separate process, so the case's own peak starts clean). Returns the parameter count and the data file."""
    import numpy as np

    module = _model(spec["arch"], spec.get("config"))
    params = sum(p.numel() for p in module.parameters())
    module.save_pretrained(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, module.config.vocab_size, (spec["samples"], spec["seq"]))
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if spec["arch"] == "bert":
        arrays["token_type_ids"] = np.zeros_like(ids)
    np.savez(folder / "data.npz", **arrays)
    return params, folder / "data.npz"


def run_cli(name: str, folder: Path, params: int) -> dict:
    """One CLI case in this process (a child): ``modelpress ARGS FOLDER --data tensors:FOLDER/data.npz`` with the
    resident set sampled and named by the reporter's steps."""
    sampler = _Sampler()
    t0 = time.perf_counter()
    sampler.set("imports")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import modelpress.cli as cli

    _instrument(sampler)
    stages: list = []
    _stage_names(sampler, stages)
    spec = CLI_CASES[name]
    out = folder.parent / f"out-{name}"
    recipe_args: list[str] = []
    if "recipe" in spec:  # a built-in recipe with one pass option changed, written as a recipe file
        import yaml

        from modelpress.compress.recipe import builtin_recipes

        text = yaml.safe_load(builtin_recipes()[spec["recipe"]["base"]].read_text())
        text["passes"][0].update({k: v for k, v in spec["recipe"].items() if k != "base"})
        text["name"] = f"{spec['recipe']['base']}-{name}"
        (folder.parent / "recipe.yaml").write_text(yaml.safe_dump(text))
        recipe_args = ["--recipe", str(folder.parent / "recipe.yaml")]
    args = [*spec["args"], *recipe_args, str(folder), "--data", f"tensors:{folder / 'data.npz'}", "-o", str(out), "--overwrite",
            "--quiet", "--json"]
    sampler.set("cli")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        cli.main(args)  # the command's entry point: its allocator setting (system.apply_malloc_setting) included
    sampler.stop()
    report = json.loads(printed.getvalue())
    weights = 4 * params
    peak = _status("VmHWM")
    rose: dict[str, int] = {}  # stage -> the kernel's high-water mark at its end, where it rose during the stage
    summary: dict[str, dict] = {}  # stage -> seconds spent in it (all its spans) and its sampled peak
    end_time = time.perf_counter() - t0
    for i, (t, stage, _, hwm, _) in enumerate(stages):
        end = stages[i + 1][3] if i + 1 < len(stages) else peak
        if end > hwm:
            rose[stage] = max(rose.get(stage, 0), end)
        until = stages[i + 1][0] if i + 1 < len(stages) else end_time
        row = summary.setdefault(stage, {"seconds": 0.0, "peak_rss_bytes": sampler.peaks.get(stage, 0)})
        row["seconds"] = round(row["seconds"] + until - t, 1)
    for row in summary.values():
        row["peak_over_fp32_weights"] = round(row["peak_rss_bytes"] / weights, 2)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "case": name, "goal": spec.get("goal"), "command": "modelpress " + " ".join(args), "params": params,
        "fp32_weight_bytes": weights,
        "calibration": {"samples": spec["samples"], "seq": spec["seq"]},
        "params_after": (report.get("after") or {}).get("parameters"),
        "peak_rss_bytes": peak, "peak_over_fp32_weights": round(peak / weights, 2),
        "peak_rss_by_phase_bytes": sampler.peaks,
        "stages_where_the_peak_rose_bytes": rose,
        "stage_summary": summary,
        "children_peak_rss_bytes": children,
        "children_peak_over_fp32_weights": round(children / weights, 2),
        "tree_peak_rss_bytes": sampler.tree_peak,
        "tree_peak_over_fp32_weights": round(sampler.tree_peak / weights, 2),
        "stages": [{"seconds": t, "stage": n, "rss_at_entry": r, "file_backed_at_entry": f}
                   for t, n, r, _, f in stages],
        "largest_growth_spans": sampler.top_spans(),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "pass_seconds": {p["pass"]: round(p["seconds"], 1) for p in report.get("passes", [])},
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-1b", action="store_true", help="also the ~1B-parameter Llama-style LM")
    ap.add_argument("--only-llama-1b", action="store_true", help="the 1B case alone")
    ap.add_argument("--iterations", type=int, default=1, help="prune.global iterations (the CLI's default is 4)")
    ap.add_argument("--label", default="after", help="key under which the results are stored (before / after)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning_memory.json")
    ap.add_argument("--case", help="run this one case in this process and print its row")
    ap.add_argument("--cli", nargs="+", choices=sorted(CLI_CASES), help="run these CLI cases (one process each)")
    ap.add_argument("--min-free-gib", type=float, default=4.0,
                    help="stop a --cli case when the machine's available memory falls under this (GiB)")
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)  # a --cli child's model folder
    ap.add_argument("--params", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.iterations)))
        return
    if args.cli and args.folder:  # a child: one CLI case
        print(json.dumps(run_cli(args.cli[0], args.folder, args.params)))
        return
    if args.cli:
        _run_cli_cases(args)
        return
    names = [] if args.only_llama_1b else ["bert-base"]
    if args.llama_1b or args.only_llama_1b:
        names.append("llama-1b")
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--iterations", str(args.iterations)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["children_ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        row["pythonpath"] = os.environ.get("PYTHONPATH", "")
        stored.setdefault(name, {})[args.label] = row
        print(f"{name} [{args.label}]: {row['params'] / 1e6:.0f}M params, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
              f" = {row['peak_over_fp32_weights']}x FP32 weights (after build {row['rss_after_build_over_fp32_weights']}x),"
              f" pruning {row['seconds_pruning']} s")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stored, indent=2) + "\n")


def _available_bytes() -> int:
    """The machine's available memory (``MemAvailable``; 0 where unknown)."""
    from modelpress.system import available_memory

    return available_memory() or 0


def _watch(child: subprocess.Popen, min_free_gib: float) -> tuple[str, int | None]:
    """Wait for ``child``, killing it if the machine's available memory falls under ``min_free_gib`` (it is
    shared). Returns its stdout and the available bytes seen when it was stopped (None if it finished)."""
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(child.stdout.read()), daemon=True)
    reader.start()
    low = None
    while child.poll() is None:
        available = _available_bytes()
        if available < min_free_gib * 2**30:
            low = available
            child.kill()
            child.wait()
            break
        time.sleep(1.0)
    reader.join()
    return "".join(chunks), low


def _run_cli_cases(args: argparse.Namespace) -> None:
    """Each CLI case: the model folder saved by one process, the CLI run in another (its peak alone)."""
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.cli:
        with tempfile.TemporaryDirectory(prefix="prune-mem-cli-") as tmp:
            folder = Path(tmp) / "model"
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import pruning_memory as pm; "
                    f"from pathlib import Path; print(pm._save_hf(pm.CLI_CASES[{name!r}], Path({str(folder)!r}))[0])")
            made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            params = int(made.stdout.strip().splitlines()[-1])
            child = subprocess.Popen([sys.executable, __file__, "--cli", name, "--folder", str(folder), "--params",
                                      str(params)], stdout=subprocess.PIPE, text=True)
            out, low = _watch(child, args.min_free_gib)
        if low is not None:
            row = {"case": name, "goal": CLI_CASES[name].get("goal"), "params": params, "stopped":
                   f"machine memory available fell to {low / 2**30:.1f} GiB (< {args.min_free_gib} GiB); see the "
                   "stage lines on stderr for how far it got"}
            stored.setdefault(name, {})[args.label] = row
            args.out.write_text(json.dumps(stored, indent=2) + "\n")
            print(f"{name} [{args.label}]: stopped, {row['stopped']}")
            continue
        if child.returncode != 0:
            raise SystemExit(f"{name} failed")
        row = json.loads(out.strip().splitlines()[-1])
        row["pythonpath"] = os.environ.get("PYTHONPATH", "")
        stored.setdefault(name, {})[args.label] = row
        print(f"{name} [{args.label}]: {row['params'] / 1e6:.0f}M params, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
              f" = {row['peak_over_fp32_weights']}x FP32 weights (with its children at the same time "
              f"{row['tree_peak_over_fp32_weights']}x), {row['seconds_total']} s")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stored, indent=2) + "\n")


if __name__ == "__main__":
    main()
