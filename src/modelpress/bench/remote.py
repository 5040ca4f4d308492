"""The client of ``modelpress agent``: a remote Target's measurements run on its device.

The protocol of the local runner is kept: the client makes the inputs (the same arrays a local run uses),
uploads each ONNX file and its external data once (by SHA-256; the agent keeps a content-addressed cache),
asks the device to time the variants interleaved, and gets back the raw per-round samples, peak memory, the
outputs' digests and the device's system facts; the runner turns them into the same report as a local run.

Only the standard library talks to the device (http.client), so the core install needs nothing more. The
token comes from ``MODELPRESS_AGENT_TOKEN``, or a file named by ``MODELPRESS_AGENT_TOKEN_FILE`` (the
commands' ``--token-file``); ``MODELPRESS_AGENT_CA`` names a CA bundle for an agent serving TLS with its own
certificate. A device that stops answering is retried with backoff, then reported in one short error.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import ssl
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from modelpress.errors import ModelpressError
from modelpress.export.files import external_data_files
from modelpress.progress import QUIET, Reporter
from modelpress.targets import Target, set_remote_profiler
from modelpress.timing import parse_shape_key, shape_key

TOKEN_ENV = "MODELPRESS_AGENT_TOKEN"
TOKEN_FILE_ENV = "MODELPRESS_AGENT_TOKEN_FILE"
CA_ENV = "MODELPRESS_AGENT_CA"
TIMEOUT_ENV = "MODELPRESS_AGENT_TIMEOUT"  # seconds one measurement may take, queue included (default 3600)
API = "/v1"
# waits between tries when the device does not answer (connection refused, reset, cut): 4 tries in all
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0)
_TOKEN_HINT = (f"set {TOKEN_ENV} to the token `modelpress agent` printed on the device, or pass --token-file FILE "
               "(the file the agent was started with)")
_RETRYABLE = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead, TimeoutError,
              http.client.BadStatusLine, OSError)


def agent_token(device: str = "the device") -> str:
    """The token for agents: ``MODELPRESS_AGENT_TOKEN``, or the file ``MODELPRESS_AGENT_TOKEN_FILE`` names."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ModelpressError(f"cannot read the token file {path}: {exc.strerror}", _TOKEN_HINT) from None
    if not token:
        raise ModelpressError(f"no token for {device}", _TOKEN_HINT)
    return token


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def inputs_archive(feeds: Mapping[tuple[int, int | None], Mapping[str, np.ndarray]]) -> bytes:
    """The inputs as a .npz (``SHAPE::NAME`` arrays, no pickles) with fixed timestamps, so the same inputs
    have the same digest and are sent once."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for shape, feed in feeds.items():
            for name, array in feed.items():
                info = zipfile.ZipInfo(f"{shape_key(*shape)}::{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with z.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@dataclass
class RemoteRun:
    """What a device measured: raw samples per variant and shape (as the local runner collects them), peak
    memory, output digests, and the device's target and system facts."""

    samples: dict[str, dict[tuple, list[list[float]]]]
    cpu: dict[str, dict[tuple, list[float]]]
    peak: dict[str, dict[str, float | None]]
    memory_errors: dict[str, str]
    digests: dict[str, dict[str, str]]
    target: dict[str, Any]
    system: dict[str, Any]
    started: float  # the device's clock (time.time()) when the timing began, ended, and the request arrived
    finished: float
    arrived: float = 0.0


class AgentClient:
    """Requests to one device's agent, with the token, TLS when the address is https, and retries."""

    def __init__(self, target: Target, token: str | None = None,
                 retry_delays_s: Sequence[float] | None = None, reporter: Reporter = QUIET) -> None:
        if not target.remote:
            raise ModelpressError(f"target {target.name} is not a device", "use remote:HOST:PORT")
        self.target = target
        self.token = token or agent_token(target.name)
        self.delays = tuple(RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s)
        self.reporter = reporter  # where retries are logged
        parts = urlsplit(str(target.address))
        self.scheme, self.host, self.port = parts.scheme, str(parts.hostname), int(parts.port or 0)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=os.environ.get(CA_ENV) or None)
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _once(self, method: str, path: str, body: Any, headers: Mapping[str, str], timeout: float
              ) -> tuple[int, bytes]:
        conn = self._connection(timeout)
        try:
            conn.request(method, API + path, body=body,
                         headers={"Authorization": f"Bearer {self.token}", **headers})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None,
                timeout: float = 60.0) -> tuple[int, Any]:
        """One request, tried again after each of the retry delays while the device does not answer.
        Returns the status and the decoded JSON body (None when empty); 401 raises ModelpressError."""
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            if hasattr(body, "seek"):
                body.seek(0)
            try:
                status, raw = self._once(method, path, body, headers or {}, timeout)
                break
            except ssl.SSLError as exc:
                raise ModelpressError(
                    f"TLS with the device {self.target.name} failed: {exc.reason or exc}",
                    f"check its certificate; for a self-signed one set {CA_ENV} to the CA file",
                ) from None
            except _RETRYABLE as exc:
                reason = _reason(exc)
                if tries > len(self.delays):
                    raise ModelpressError(
                        f"the device {self.target.name} stopped answering ({reason}; {tries} tries over "
                        f"{time.monotonic() - started:.1f} s)",
                        "check that `modelpress agent` still runs there and the network reaches it; "
                        "nothing was written",
                    ) from None
                delay = self.delays[tries - 1]
                self.reporter.log(f"device {self.target.name}: {reason}; trying again in {delay:g} s")
                time.sleep(delay)
        if status == 401:
            raise ModelpressError(f"the device {self.target.name} refused the token (401)", _TOKEN_HINT)
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            data = {"error": raw[:200].decode(errors="replace")}
        return status, data

    def _refused(self, what: str, status: int, data: Any) -> ModelpressError:
        message = data.get("error") if isinstance(data, dict) else None
        return ModelpressError(f"the device {self.target.name} refused {what} ({status}: {message or 'no reason'})")

    def info(self) -> dict[str, Any]:
        """The device: its system, ONNX Runtime providers, default threads, limits and queue."""
        status, data = self.request("GET", "/info", timeout=30.0)
        if status != 200 or not isinstance(data, dict) or data.get("agent") != "modelpress":
            raise ModelpressError(f"{self.target.address} is not a modelpress agent (status {status})",
                                  "check the host and port")
        return data

    def upload(self, sha: str, kind: str, source: Path | bytes, name: str) -> None:
        """Send one file unless the device has it already (same SHA-256 and kind)."""
        status, _ = self.request("HEAD", f"/files/{sha}", headers={"X-Modelpress-Kind": kind})
        if status == 200:
            return
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        headers = {"X-Modelpress-Kind": kind, "Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if size > 2**20:
            self.reporter.log(f"uploading {name} ({size / 2**20:.1f} MiB) to {self.target.name}")
        if isinstance(source, bytes):
            status, data = self.request("PUT", f"/files/{sha}", body=source, headers=headers, timeout=600.0)
        else:
            with open(source, "rb") as fh:
                status, data = self.request("PUT", f"/files/{sha}", body=fh, headers=headers, timeout=600.0)
        if status != 201:
            raise self._refused(f"{name}", status, data)


def resolve(target: Target, threads: int | None = None) -> Target:
    """``target`` with the device's default threads (unless ``threads``) and providers filled in: asks the
    device once, so a wrong token or address fails here, before any slow work."""
    info = AgentClient(target).info()
    chosen = threads or target.threads or int(info["default_threads"])
    providers = tuple(info.get("default_providers") or target.providers)
    return replace(target, threads=chosen, providers=providers)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        return "connection cut"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def _variant_files(path: Path) -> tuple[str, dict[str, tuple[str, Path]]]:
    """A model's SHA-256 and its external data files: relative name -> (SHA-256, path)."""
    data = {}
    for f in external_data_files(path):
        try:
            rel = f.relative_to(path.parent).as_posix()
        except ValueError:
            rel = ""
        if not rel or ".." in Path(rel).parts:
            raise ModelpressError(f"{path.name} refers to external data outside its folder ({f})",
                                  "save the model with its .data file beside it")
        if not f.is_file():
            raise ModelpressError(f"{path.name} refers to external data {f.name}, which is missing",
                                  "keep the .data file beside the model")
        data[rel] = (file_sha256(f), f)
    return file_sha256(path), data


def measure_remote(
    target: Target,
    onnx_paths: Mapping[str, Path],
    feeds: Mapping[tuple[int, int | None], Mapping[str, np.ndarray]],
    shapes: Sequence[tuple[int, int | None]],
    *,
    rounds: int,
    runs: int,
    min_time_s: float,
    warmup: int,
    max_runs: int,
    max_time_s: float,
    memory: bool,
    reporter: Reporter = QUIET,
) -> RemoteRun:
    """Time ONNX files interleaved on ``target``'s device; see the module docstring."""
    data, info = _run_on_device(target, onnx_paths, feeds, shapes, reporter, {
        "rounds": rounds, "runs": runs, "warmup": warmup, "max_runs": max_runs, "min_time_s": min_time_s,
        "max_time_s": max_time_s, "memory": memory, "digests": True,
    })
    by_key = {shape_key(*s): s for s in shapes}

    def shaped(per_variant: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[tuple, Any]]:
        return {n: {by_key.get(k, parse_shape_key(k)): v for k, v in per.items()} for n, per in per_variant.items()}

    device_target = dict(data.get("target") or {})
    return RemoteRun(
        samples=shaped(data["samples"]), cpu=shaped(data["cpu"]), peak=dict(data.get("peak") or {}),
        memory_errors=dict(data.get("memory_errors") or {}), digests=dict(data.get("digests") or {}),
        target={**target.to_dict(), "threads": device_target.get("threads", target.threads),
                "providers": device_target.get("providers", list(target.providers)), "device": info.get("device")},
        system=dict(data.get("system") or {}), started=float(data.get("started", 0.0)),
        finished=float(data.get("finished", 0.0)), arrived=float(data.get("arrived", 0.0)),
    )


def node_times(target: Target, path: os.PathLike | str, feeds: Mapping[str, np.ndarray], runs: int = 10
               ) -> dict[str, float]:
    """:meth:`Target.node_times` on the device: ONNX Runtime's per-node median milliseconds there."""
    first = next(iter(feeds.values()))
    shape = (int(np.shape(first)[0]) if np.ndim(first) else 1, None)
    data, _ = _run_on_device(target, {"model": Path(path)}, {shape: dict(feeds)}, [shape], QUIET, {
        "rounds": 1, "runs": 1, "warmup": 0, "min_time_s": 0.0, "memory": False, "digests": False,
        "profile": True, "profile_runs": runs,
    })
    return {k: float(v) for k, v in data["node_times"]["model"].items()}


set_remote_profiler(node_times)


def _run_on_device(
    target: Target, onnx_paths: Mapping[str, Path], feeds: Mapping[tuple[int, int | None], Mapping[str, np.ndarray]],
    shapes: Sequence[tuple[int, int | None]], reporter: Reporter, settings: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload what the device lacks and run one measurement request there; returns its answer and the
    device's info."""
    client = AgentClient(target, reporter=reporter)
    info = client.info()
    limit = int(info.get("max_upload_bytes") or 0)
    files: dict[str, tuple[str, Path | bytes, str]] = {}  # sha -> kind, source, name
    variants: dict[str, dict[str, Any]] = {}
    for name, path in onnx_paths.items():
        sha, data = _variant_files(Path(path))
        files.setdefault(sha, ("model", Path(path), Path(path).name))
        for rel, (dsha, dpath) in data.items():
            files.setdefault(dsha, ("data", dpath, rel))
        variants[name] = {"model": sha, "data": {rel: dsha for rel, (dsha, _) in data.items()}}
    archive = inputs_archive({s: feeds[s] for s in shapes})
    inputs_sha = hashlib.sha256(archive).hexdigest()
    files[inputs_sha] = ("inputs", archive, "inputs")
    for _sha, (_kind, source, fname) in files.items():
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        if limit and size > limit:
            raise ModelpressError(
                f"{fname} is {size / 2**20:.1f} MiB, over the device {target.name}'s upload limit of "
                f"{limit / 2**20:.1f} MiB", "start the agent with a larger --max-upload-mb")
    payload = {
        "variants": variants, "inputs": inputs_sha, "shapes": [shape_key(*s) for s in shapes],
        "threads": target.threads,  # 0: the device's default; providers: always the device's (agent --providers)
        "session_config": dict(target.session_config), "provider_options": [dict(o) for o in target.provider_options],
        **settings,
    }
    body = json.dumps(payload).encode()
    timeout = float(os.environ.get(TIMEOUT_ENV, 3600))
    pending = list(files)
    for _ in range(3):  # the device may lose its cache (restarted, evicted) between uploads and the request
        for sha in pending:
            kind, source, fname = files[sha]
            client.upload(sha, kind, source, fname)
        with reporter.step(f"measuring {len(variants)} variants x {settings['rounds']} rounds on {target.name}"):
            status, data = client.request("POST", "/measure", body=body,
                                          headers={"Content-Type": "application/json"}, timeout=timeout)
        if status == 409 and isinstance(data, dict):
            pending = [s for s in data.get("missing", []) if s in files]
            if pending:
                continue
        break
    if status != 200 or not isinstance(data, dict):
        raise client._refused("the measurement", status, data)
    return data, info
