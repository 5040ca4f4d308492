"""Executors: where candidate evaluations run. One interface (``map`` a top-level function over items, and
``on_target`` for latency measurements, which must run on the target machine's workers): a local process
pool (default; ``workers=1`` runs in this process) and Ray (optional extra ``modelpress[ray]``) to spread
the evaluations over a cluster. No home-made cluster code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelpress.errors import ModelpressError

EXECUTORS = ("local", "ray")


class LocalExecutor:
    """``workers`` processes (spawned, each rebuilding the evaluator from the run folder); 1: this process."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ModelpressError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._pool: Any = None

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if self.workers == 1 or len(items) <= 1:
            return [fn(i) for i in items]
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return list(self._pool.map(fn, items))

    def on_target(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class RayExecutor:
    """Evaluations as Ray tasks. ``address``: an existing cluster (``ray://...`` or ``auto``); None starts a
    local runtime. ``target_resource``: a custom Ray resource only the target machine's nodes offer
    (``ray start --resources='{"ort-cpu": 1}'``); latency measurements ask for it, so they run there."""

    name = "ray"

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

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        remote = self._ray.remote(num_cpus=1)(fn)
        return self._ray.get([remote.remote(i) for i in items])

    def on_target(self, fn: Callable[[Any], Any], item: Any) -> Any:
        opts: dict[str, Any] = {"num_cpus": 1}
        if self.target_resource:
            opts["resources"] = {self.target_resource: 1}
        return self._ray.get(self._ray.remote(**opts)(fn).remote(item))

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ModelpressError("the Ray executor needs ray, which is not installed",
                              "pip install 'modelpress[ray]', or use --executor local") from exc
    return ray


def make_executor(name: str, *, workers: int = 1, address: str | None = None,
                  target_resource: str | None = None) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, num_cpus=workers if address is None else None, target_resource=target_resource)
    raise ModelpressError(f"unknown executor {name!r}", f"choose one of {', '.join(EXECUTORS)}")
