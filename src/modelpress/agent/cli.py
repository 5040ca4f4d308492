"""The agent's options turned into settings (shared by ``modelpress agent`` and ``python -m modelpress.agent``)."""

from __future__ import annotations

from pathlib import Path

from modelpress.agent.server import AgentSettings, read_token, serve
from modelpress.errors import ModelpressError
from modelpress.system import cpu_count


def run(host: str = "127.0.0.1", port: int = 8765, token_file: Path | None = None, threads: int | None = None,
        providers: str | None = None, name: str | None = None, max_upload_mb: float = 2048.0,
        cache_mb: float = 8192.0, cache_dir: Path | None = None, certfile: Path | None = None,
        keyfile: Path | None = None) -> None:
    """Check the options, print the token once when generated, and serve until interrupted."""
    import onnxruntime as ort

    if not 0 <= port <= 65535:
        raise ModelpressError(f"--port {port} is not a port number", "use 1-65535, or 0 for any free port")
    if threads is not None and threads < 1:
        raise ModelpressError(f"--threads must be at least 1, got {threads}")
    if max_upload_mb <= 0 or cache_mb < max_upload_mb:
        raise ModelpressError("--max-upload-mb must be positive and --cache-mb at least as large")
    chosen = tuple(p.strip() for p in (providers or "CPUExecutionProvider").split(",") if p.strip())
    missing = [p for p in chosen if p not in ort.get_available_providers()]
    if missing:
        raise ModelpressError(f"this ONNX Runtime does not offer {', '.join(missing)}",
                              f"it offers {', '.join(ort.get_available_providers())}")
    for f in (certfile, keyfile):
        if f is not None and not Path(f).is_file():
            raise ModelpressError(f"TLS file not found: {f}", "give the PEM certificate and key")
    token, generated = read_token(token_file)
    settings = AgentSettings(
        token=token, host=host, port=port, threads=threads or cpu_count(), providers=chosen,
        max_upload_bytes=int(max_upload_mb * 2**20), max_cache_bytes=int(cache_mb * 2**20), cache_dir=cache_dir,
        certfile=certfile, keyfile=keyfile, **({"name": name} if name else {}),
    )
    if generated:
        print(f"modelpress agent token (shown once; clients read it from MODELPRESS_AGENT_TOKEN or --token-file): "
              f"{token}", flush=True)
    serve(settings)
