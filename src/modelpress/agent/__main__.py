"""``python -m modelpress.agent``: the measurement agent without the modelpress command line (a device that
has only onnxruntime, numpy and the agent's server library installed can run it). Options as
``modelpress agent --help``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelpress.errors import ModelpressError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modelpress.agent", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port, printed at start)")
    p.add_argument("--token-file", type=Path, help="file holding the token (default: generate one, print it once)")
    p.add_argument("--threads", type=int, help="default ONNX Runtime threads (default: all usable cores)")
    p.add_argument("--providers", help="default providers, comma-separated (default: CPUExecutionProvider)")
    p.add_argument("--name", help="device name in reports (default: the host name)")
    p.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest accepted file (MiB)")
    p.add_argument("--cache-mb", type=float, default=8192.0, help="model cache size (MiB)")
    p.add_argument("--cache-dir", type=Path, help="keep the model cache here (default: a temporary folder)")
    p.add_argument("--certfile", type=Path, help="TLS certificate (PEM)")
    p.add_argument("--keyfile", type=Path, help="TLS private key (PEM)")
    return p


def main(argv: list[str] | None = None) -> None:
    from modelpress.agent.cli import run

    args = parser().parse_args(argv)
    try:
        run(**vars(args))
    except ModelpressError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.hint:
            print(f"  -> {exc.hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
