"""The agent's HTTP server (starlette on uvicorn: small, pure-Python wheels that install on any device, with
streamed request bodies and TLS built in).

Endpoints (all need ``Authorization: Bearer TOKEN``, compared in constant time; anything else is 401):
``GET /v1/info`` the device (CPU, accelerator, ONNX Runtime version and providers, memory, limits, queue);
``HEAD /v1/files/SHA`` whether a file is cached; ``PUT /v1/files/SHA`` stream one file into the cache
(header ``X-Modelpress-Kind``: model, data or inputs; over the size limit: 413; not ONNX: 415);
``POST /v1/measure`` time the named files (409 with the missing digests when some are not cached).
Measurements run one at a time, in arrival order; the others wait for the lock (the queue), so timings on
one device never overlap.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.agent.measure import BadRequest, parse_request, run_measurement
from modelpress.agent.protocol import API
from modelpress.agent.store import Store, UploadError
from modelpress.errors import ModelpressError
from modelpress.system import available_memory, cpu_count, system_info

MAX_REQUEST_BYTES = 4 * 2**20  # a measurement request's JSON (the files go through PUT)


@dataclass
class AgentSettings:
    """How an agent serves: address, token, defaults for requests that leave them out, limits, TLS."""

    token: str
    host: str = "127.0.0.1"
    port: int = 8765
    threads: int = field(default_factory=cpu_count)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    name: str = field(default_factory=socket.gethostname)
    max_upload_bytes: int = 2 * 2**30
    max_cache_bytes: int = 8 * 2**30
    cache_dir: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None


class _State:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.busy = False
        self.waiting = 0
        self.measurements = 0
        self.refused = 0


def _accelerators(providers: list[str]) -> list[str]:
    """GPU names when a GPU provider is present (nvidia-smi), else none."""
    if not any(p in providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def create_app(settings: AgentSettings, store: Store) -> Any:
    """The ASGI application of one agent (serving ``store``)."""
    import onnxruntime as ort
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    state = _State()
    available = list(ort.get_available_providers())
    device = {"accelerators": _accelerators(available), "device_name": settings.name,
              "ort_version": ort.__version__}
    token = settings.token.encode()

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    async def info(_request: Request) -> JSONResponse:
        system = system_info(settings.threads)
        system.update(device)
        return JSONResponse({
            "agent": "modelpress", "api": API, "device": settings.name, "providers": available,
            "default_providers": list(settings.providers), "default_threads": settings.threads,
            "max_threads": max(cpu_count(), settings.threads), "max_upload_bytes": store.max_upload,
            "memory_available_bytes": available_memory(), "busy": state.busy, "waiting": state.waiting,
            "measurements": state.measurements, "refused": state.refused, "uploads": store.uploads,
            "files": len(store.kinds), "system": system,
        })

    async def head_file(request: Request) -> Response:
        sha = request.path_params["sha"]
        kind = request.headers.get("x-modelpress-kind")
        found = store.path(sha) is not None and (kind is None or store.kinds.get(sha) == kind)
        return Response(status_code=200 if found else 404)

    async def put_file(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        try:
            declared = int(length) if length is not None else None
            await store.receive(request.path_params["sha"], request.headers.get("x-modelpress-kind", "data"),
                                declared, request.stream())
        except ValueError:
            return error(400, "bad Content-Length")
        except UploadError as exc:
            return error(exc.status, exc.message)
        return JSONResponse({"stored": request.path_params["sha"]}, status_code=201)

    async def measure(request: Request) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return error(413, f"a measurement request is at most {MAX_REQUEST_BYTES} bytes")
        try:
            req = parse_request(json.loads(body or b"null"), available, settings.providers, settings.threads,
                                max(cpu_count(), settings.threads))
        except json.JSONDecodeError:
            return error(400, "the request is not JSON")
        except BadRequest as exc:
            return error(400, str(exc))
        missing = store.missing(req.files())
        if missing:
            return error(409, "files missing: upload them first", missing=missing)
        arrived = time.time()
        state.waiting += 1
        try:
            await state.lock.acquire()  # the queue: one measurement at a time, in arrival order
        finally:
            state.waiting -= 1
        state.busy = True
        try:
            missing = store.missing(req.files())  # evicted while waiting
            if missing:
                return error(409, "files missing: upload them first", missing=missing)
            result = await run_in_threadpool(run_measurement, req, store, settings.name, device)
        except BadRequest as exc:
            return error(400, str(exc))
        except ModelpressError as exc:
            return error(422, exc.problem)
        except Exception as exc:  # e.g. ONNX Runtime failing on the inputs: answered, and the agent serves on
            first = (str(exc).splitlines() or [""])[0][:500]
            return error(500, f"the measurement failed: {type(exc).__name__}: {first}")
        finally:
            state.busy = False
            state.lock.release()
        state.measurements += 1
        result["arrived"] = arrived
        result["queued_s"] = round(result["started"] - arrived, 3)
        result["measurement"] = state.measurements
        return JSONResponse(result)

    app = Starlette(routes=[
        Route(f"/{API}/info", info, methods=["GET"]),
        Route(f"/{API}/files/{{sha}}", head_file, methods=["HEAD"]),
        Route(f"/{API}/files/{{sha}}", put_file, methods=["PUT"]),
        Route(f"/{API}/measure", measure, methods=["POST"]),
    ])

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not (got.startswith(b"Bearer ") and hmac.compare_digest(got[7:], token)):
                state.refused += 1
                response = JSONResponse({"error": "missing or wrong token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    guarded.state = state  # type: ignore[attr-defined]  # for tests and the info endpoint
    return guarded


def read_token(token_file: Path | None) -> tuple[str, bool]:
    """The token from ``token_file`` (at least 16 characters), or a new random one. Returns it and whether it
    was generated (then the caller prints it once)."""
    if token_file is None:
        return secrets.token_urlsafe(24), True
    try:
        text = Path(token_file).read_text().strip()
        mode = Path(token_file).stat().st_mode
    except OSError as exc:
        raise ModelpressError(f"cannot read the token file {token_file}: {exc.strerror}", "check the path") from None
    if len(text) < 16 or any(c.isspace() for c in text):
        raise ModelpressError(f"the token in {token_file} is too short or has spaces",
                              "use at least 16 characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {token_file} can be read by other users; chmod 600 it", file=sys.stderr)
    return text, False


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _exit_on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def serve(settings: AgentSettings, announce: Any = None) -> None:
    """Bind, print where the agent listens, and serve until interrupted; the cache folder (a temporary one
    unless ``cache_dir``) is removed at exit. ``announce`` receives the printed lines (default: stdout)."""
    try:
        import uvicorn
    except ImportError:
        raise ModelpressError("the agent needs its server library (starlette and uvicorn)",
                              "pip install 'modelpress[agent]'") from None
    say = announce or (lambda line: print(line, flush=True))
    if (settings.certfile is None) != (settings.keyfile is None):
        raise ModelpressError("TLS needs both --certfile and --keyfile")
    tls = settings.certfile is not None
    if not tls and not _loopback(settings.host):
        print(f"warning: serving {settings.host} without TLS: the token and the models travel in clear text; "
              "give --certfile and --keyfile", file=sys.stderr)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError as exc:
        sock.close()
        raise ModelpressError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
                              "choose another --port, or stop what uses it") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    temporary = settings.cache_dir is None
    root = Path(tempfile.mkdtemp(prefix="modelpress-agent-")) if temporary else Path(settings.cache_dir)
    try:
        store = Store(root, settings.max_upload_bytes, settings.max_cache_bytes)
        app = create_app(settings, store)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                                ssl_certfile=str(settings.certfile) if tls else None,
                                ssl_keyfile=str(settings.keyfile) if tls else None)
        scheme = "https" if tls else "http"
        shown = f"[{settings.host.strip('[]')}]" if family == socket.AF_INET6 else settings.host
        say(f"modelpress agent {settings.name}: listening on {scheme}://{shown}:{port} "
            f"({settings.threads} threads, {', '.join(settings.providers)}; pid {os.getpid()})")
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: with this handler that ends
        # in SystemExit, so the cache folder below is still removed
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.rmtree(root / "work", ignore_errors=True)
            shutil.rmtree(root / "incoming", ignore_errors=True)
