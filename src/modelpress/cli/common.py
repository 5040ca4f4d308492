"""What every command shares: the common options, the reporter, loading the model, preparing outputs,
printing JSON or tables, and turning errors into one short message with exit code 2."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from modelpress.errors import ModelpressError

# Options (and the checkpoint argument) that several commands take, declared once.
Ckpt = Annotated[
    str | None,
    typer.Argument(help="hf:DIR, a HF folder, a saved modelpress folder, timm:NAME, torchvision:NAME, pkg.mod:factory, or FILE.pt; default: all-MiniLM-L6-v2"),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled .pt/.pth modules (runs code).")]
Data = Annotated[str | None, typer.Option("--data", help="digits | text:FILE | images:DIR | tensors:FILE.npz")]
Out = Annotated[Path | None, typer.Option("--output", "-o", help="Output directory (default: ./compressed-NAME).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
TargetOpt = Annotated[str, typer.Option(
    "--target", help="ort-cpu | edge | ort-cuda | tensorrt | remote:HOST:PORT (a device running `modelpress agent`; "
    "its token from MODELPRESS_AGENT_TOKEN or --token-file)")]
TokenFile = Annotated[Path | None, typer.Option(
    "--token-file", help="With --target remote:HOST:PORT: file holding the agent's token.")]
Threads = Annotated[int | None, typer.Option("--threads", help="Threads for ONNX Runtime (default: the target's).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
InputShape = Annotated[str | None, typer.Option("--input-shape", help="C,H,W for modules that do not say.")]

_OUTPUT_HINT = "choose another -o, in a folder you can write to"


def reporter(quiet: bool):  # noqa: ANN201
    """The progress reporter of one command (silent with --quiet or --json)."""
    from modelpress.progress import Reporter

    return Reporter(quiet=quiet)


def console():  # noqa: ANN201
    """A rich console for results on stdout; wide when not a terminal, so pipes and logs keep whole tables."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)


def jsonable(obj: Any) -> Any:
    """json.dumps fallback: arrays become lists, everything else its string."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def print_json(data: Any) -> None:
    """A command's result as JSON on stdout (--json)."""
    typer.echo(json.dumps(data, indent=2, default=jsonable))


def print_rich(*renderables: Any) -> None:
    """A command's result as tables and lines on stdout."""
    out = console()
    for r in renderables:
        out.print(r)


def resolve_target(target: str, threads: int | None, token_file: Path | None = None) -> Any:
    """The command's Target. A device (``remote:HOST:PORT``) is asked once now, so a wrong address or token
    fails in one line before any slow work; ``--token-file`` is passed on to worker processes through
    ``MODELPRESS_AGENT_TOKEN_FILE``."""
    from modelpress.targets import get_target

    if token_file is not None:
        if not token_file.is_file():
            raise ModelpressError(f"token file not found: {token_file}", "give the file the agent was started with")
        os.environ["MODELPRESS_AGENT_TOKEN_FILE"] = str(token_file.absolute())
        os.environ.pop("MODELPRESS_AGENT_TOKEN", None)  # the file given on the command line wins
    tgt = get_target(target, threads=threads)
    if tgt.remote:
        from modelpress.bench.remote import resolve

        tgt = resolve(tgt, threads)
    elif token_file is not None:
        raise ModelpressError("--token-file goes with --target remote:HOST:PORT")
    return tgt


def decoder_lowering_of(module: Any) -> Any:
    """The lowering a compressed model's own layers need in the cached decoder (packed weight-only layers:
    MatMulNBits), or None for float models."""
    from modelpress.quantize.weight_only_export import decoder_lowering
    from modelpress.quantize.weight_only_pack import is_weight_only

    return decoder_lowering() if is_weight_only(module) else None


def load_graph(ckpt: str | None, trust_pickle: bool, input_shape: str | None, rep: Any, seed: int = 0) -> Any:
    """Load the checkpoint argument as a ModelGraph, parsing --input-shape first; ``seed`` (the command's
    --seed, 0 for commands without one) draws the random weights of timm/torchvision models without weights."""
    from modelpress.models import load
    from modelpress.system import freeze_loaded_code

    # the libraries every compressing command imports anyway, out of the memory steps' full collections
    freeze_loaded_code(("transformers", "onnx", "onnxruntime"))
    shape = None
    if input_shape:
        try:
            shape = tuple(int(x) for x in input_shape.split(","))
        except ValueError as exc:
            raise ModelpressError(f"--input-shape {input_shape!r} is not a list of integers", "e.g. --input-shape 3,224,224") from exc
    with rep.step(f"loading {ckpt or 'the default model (all-MiniLM-L6-v2)'}"):
        return load(ckpt, trust_pickle=trust_pickle, input_shape=shape, seed=seed)


def check_writable(path: Path) -> None:
    """Fail now, before any slow work, when nothing could be written at `path`: its nearest existing
    ancestor must be a folder that accepts new files. Creates nothing that stays behind."""
    folder = path.absolute().parent
    try:
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise ModelpressError(f"cannot write {path}: {folder} is a file, not a folder", _OUTPUT_HINT)
        fd, probe = tempfile.mkstemp(prefix=".modelpress-probe-", dir=folder)
    except OSError as exc:
        raise ModelpressError(f"cannot write {path}: folder {folder} does not accept new files ({exc.strerror})",
                              _OUTPUT_HINT) from exc
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, overwrite: bool = True) -> None:
    """An output file: not an existing one unless --overwrite, not a folder, and writable."""
    if path.exists() and not overwrite:
        raise ModelpressError(f"output {path} already exists", "pass --overwrite to replace it")
    if path.is_dir():
        raise ModelpressError(f"output {path} is a folder", f"give a file name, e.g. -o {path / 'model.onnx'}")
    check_writable(path)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """An output folder: not an existing one unless --overwrite, not a file, and writable."""
    if out.exists() and not overwrite:
        raise ModelpressError(f"output {out} already exists", "pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise ModelpressError(f"output {out} exists and is not a directory", "choose another -o")
    check_writable(out)


# OS errors that come from the user's paths or machine (permissions, read-only or full disks), not from a bug
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _usage_errors() -> tuple[type[Exception], ...]:
    """Command-line parsing errors: typer's own click (typer >= 0.20) or click itself (older typer)."""
    types: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


def fail(problem: str, hint: str | None = None, code: int = 2) -> NoReturn:
    """Print `error: PROBLEM` (and `  -> HINT`) on stderr and exit."""
    print(f"error: {problem}", file=sys.stderr)
    if hint:
        print(f"  -> {hint}", file=sys.stderr)
    sys.exit(code)


# the packages of the `torch` extra (pyproject.toml): a core install (`modelpress[agent]` on a device) lacks them
TORCH_EXTRA = frozenset({"torch", "onnx", "transformers", "safetensors", "scipy", "yaml", "pydantic"})


_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent) + os.sep  # modelpress/: where its own warnings come from


def short_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints modelpress's own warnings as one line, ``warning: <message>``
    (not a file path, a line number and a source line); ``show`` prints the others (a library's)."""
    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:  # noqa: ANN401
        if not str(filename).startswith(_PACKAGE_DIR):
            show(message, category, filename, lineno, file, line)
            return
        print(f"warning: {message}", file=file if file is not None else sys.stderr)
    return showwarning


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input of any kind (ModelpressError, a command-line mistake, an unwritable path) ends with one
    short message and exit code 2, without a traceback; anything else is reported as a bug (exit 1)."""
    try:
        yield
    except ModelpressError as exc:
        fail(exc.problem, exc.hint)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _usage_errors() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already on the screen
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `modelpress --help`"
        fail(" ".join(exc.format_message().split()), hint)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TORCH_EXTRA:
            _bug(exc)
        fail(f"this command needs the `torch` extra, which this install lacks (no module named {exc.name!r})",
             "pip install torch==2.13.0 (the CPU build) && pip install 'modelpress[torch]'")
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS or not exc.filename:
            _bug(exc)
        fail(f"{exc.strerror}: {exc.filename}", "check the path's permissions and the free disk space")
    except Exception as exc:
        _bug(exc)


def _bug(exc: Exception) -> NoReturn:
    if os.environ.get("MODELPRESS_DEBUG"):
        traceback.print_exc()
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    fail(f"{type(exc).__name__}: {first}", "this looks like a modelpress bug; rerun with MODELPRESS_DEBUG=1 for the traceback", 1)
