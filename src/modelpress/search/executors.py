"""Executors: where candidate evaluations run. One interface (``share`` an object with the workers once,
``map`` a top-level function over items with the shared objects, and ``on_target`` for latency measurements,
which must run on the target machine's workers): a local process pool (default; ``workers=1`` runs in this
process) and Ray (optional extra ``modelpress[ray]``; shared objects go through its object store) to spread
the evaluations over a cluster. No home-made cluster code, no shared filesystem."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any

from modelpress.errors import ModelpressError

EXECUTORS = ("local", "ray")
RAY_GCS_PORT = 6379  # `ray start --head`'s default port (HOST alone)
RAY_CLIENT_PORT = 10001  # the Ray client server's default port (ray://HOST alone)
CONNECT_TIMEOUT_S = 2.0
_ADDRESS_HINT = "give --ray-address HOST:PORT or ray://HOST:PORT of a running cluster (ray status), or use --executor local"


class Shared:
    """A handle to an object shared with the workers once (``Executor.share``), passed to ``map`` and
    ``on_target`` beside the items; the worker function gets the object itself."""

    def __init__(self, key: str) -> None:
        self.key = key


_INSTALLED: dict[str, Any] = {}  # a local pool process's shared objects (set by its initializer)


def _install(shared: dict[str, Any]) -> None:
    _INSTALLED.update(shared)


def _call(job: tuple[Callable[..., Any], Any, list[str]]) -> Any:
    fn, item, keys = job
    return fn(item, *[_INSTALLED[k] for k in keys])


class LocalExecutor:
    """``workers`` processes (spawned; the shared objects are installed once per process by the pool's
    initializer); 1: this process."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ModelpressError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.in_process = workers == 1  # its items run in the driver's process
        self._pool: Any = None
        self._shared: dict[str, Any] = {}

    def share(self, obj: Any) -> Shared:
        key = uuid.uuid4().hex
        self._shared[key] = obj
        self._close_pool()  # a pool started before knows nothing of it
        return Shared(key)

    def map(self, fn: Callable[..., Any], items: list[Any], *shared: Shared) -> list[Any]:
        if self.workers == 1 or len(items) <= 1:
            objs = [self._shared[s.key] for s in shared]
            return [fn(i, *objs) for i in items]
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_install, initargs=(self._shared,))
        keys = [s.key for s in shared]
        return list(self._pool.map(_call, [(fn, i, keys) for i in items]))

    def on_target(self, fn: Callable[..., Any], item: Any, *shared: Shared) -> Any:
        return fn(item, *[self._shared[s.key] for s in shared])

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def close(self) -> None:
        self._close_pool()
        self._shared.clear()


class RayExecutor:
    """Evaluations as Ray tasks; what they share (the super-network, the data, the baselines' ONNX bytes) goes
    through Ray's object store (``share`` = ``ray.put``), never through a path: workers need no shared disk.
    ``address``: an existing cluster (``ray://...`` or ``auto``); None starts a local runtime (an already
    initialized Ray is used as it is). ``target_resource``: a custom Ray resource only the target machine's
    nodes offer (``ray start --resources='{"ort-cpu": 1}'``); latency measurements ask for it, so they run
    there."""

    name = "ray"
    in_process = False

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 target_resource: str | None = None) -> None:
        ray = require_ray()
        self._ray = ray
        self.target_resource = target_resource
        if not ray.is_initialized():
            try:
                ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True, configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - Ray raises many types when the cluster is unreachable
                raise ModelpressError(
                    f"cannot reach the Ray cluster {address or '(local)'}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                    "check the address (ray status), or use --executor local",
                ) from exc
            self._started = True
        else:
            self._started = False

    def share(self, obj: Any) -> Any:
        return self._ray.put(obj)

    def map(self, fn: Callable[..., Any], items: list[Any], *shared: Any) -> list[Any]:
        remote = self._ray.remote(num_cpus=1)(fn)
        return self._ray.get([remote.remote(i, *shared) for i in items])  # top-level refs: resolved by Ray

    def on_target(self, fn: Callable[..., Any], item: Any, *shared: Any) -> Any:
        opts: dict[str, Any] = {"num_cpus": 1}
        if self.target_resource:
            opts["resources"] = {self.target_resource: 1}
        return self._ray.get(self._ray.remote(**opts)(fn).remote(item, *shared))

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def require_ray() -> Any:
    """The ray module, or a short error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ModelpressError("the Ray executor needs ray, which is not installed",
                              "pip install 'modelpress[ray]', or use --executor local") from exc
    return ray


def ray_endpoint(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address: ``HOST:PORT``, ``ray://HOST[:PORT]``, ``HOST`` or ``[IPv6]:PORT``."""
    rest = address.strip()
    client = rest.startswith("ray://")
    rest = rest.removeprefix("ray://").rstrip("/")
    default = RAY_CLIENT_PORT if client else RAY_GCS_PORT
    if rest.startswith("["):  # [IPv6]:PORT
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host or "://" in rest or not (port == "" or port.isdigit()) or not 0 < int(port or default) < 65536:
        raise ModelpressError(f"--ray-address {address!r} is not HOST:PORT", _ADDRESS_HINT)
    return host, int(port or default)


def check_ray_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, before any work, when nothing answers at ``address`` (a TCP connect to its host and
    port): ``ray.init`` would otherwise retry for minutes. None or ``auto`` (a local runtime, or the
    cluster this machine belongs to) is left to Ray."""
    if address is None or address.strip() in ("", "auto", "local"):
        return
    host, port = ray_endpoint(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else (
            exc.strerror or type(exc).__name__).lower()
        raise ModelpressError(f"no Ray cluster answers at {address} ({host}:{port}: {why})", _ADDRESS_HINT) from exc


def check_executor(name: str, address: str | None = None) -> None:
    """Everything about the executor that can be refused before any work: its name, Ray installed, and a
    Ray address that answers; ``--ray-address`` only with the Ray executor."""
    if name not in EXECUTORS:
        raise ModelpressError(f"unknown executor {name!r}", f"choose one of {', '.join(EXECUTORS)}")
    if name != "ray":
        if address is not None:
            raise ModelpressError("--ray-address is for the Ray executor", "add --executor ray, or drop --ray-address")
        return
    require_ray()
    check_ray_address(address)


def make_executor(name: str, *, workers: int = 1, address: str | None = None,
                  target_resource: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor ``name`` (checked with ``check_executor`` first: no Ray call on an unreachable address)."""
    check_executor(name, address)
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, num_cpus=workers if address is None else None, target_resource=target_resource)
    raise ModelpressError(f"unknown executor {name!r}", f"choose one of {', '.join(EXECUTORS)}")
