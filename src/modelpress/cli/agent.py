"""`modelpress agent`: serve measurements on this machine (a device) for `--target remote:HOST:PORT` elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def agent(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port, printed at start).")] = 8765,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File holding the token clients must send (default: generate one and print it once).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Default ONNX Runtime threads (default: all usable cores).")] = None,
    providers: Annotated[str | None, typer.Option("--providers", help="Default providers, comma-separated (default: CPUExecutionProvider).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Device name in reports (default: the host name).")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest accepted file, MiB.")] = 2048.0,
    cache_mb: Annotated[float, typer.Option("--cache-mb", help="Model cache size, MiB (least recently used go first).")] = 8192.0,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Keep the model cache here (default: a temporary folder, removed at exit).")] = None,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="TLS certificate (PEM): serve https.")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="TLS private key (PEM).")] = None,
) -> None:
    """Measurement agent for a device: times uploaded ONNX models here, one measurement at a time, for
    `--target remote:HOST:PORT` on another machine. Needs the agent extra (starlette and uvicorn)."""
    from modelpress.agent.cli import run

    run(host=host, port=port, token_file=token_file, threads=threads, providers=providers, name=name,
        max_upload_mb=max_upload_mb, cache_mb=cache_mb, cache_dir=cache_dir, certfile=certfile, keyfile=keyfile)
