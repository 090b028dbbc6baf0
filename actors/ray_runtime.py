"""Starting and joining Ray, kept on loopback.

Ray binds the machine's network address unless told otherwise; local-only
mode (set before ray is imported) keeps GCS, raylet and workers on 127.0.0.1.
Joining a cluster (`ray.address`) takes its auth token from Ray's own
environment (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH), as `ray start` set it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from scheduler.config import RayConfig

LOOPBACK = "127.0.0.1"
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's deduplicated log streaming and its rich console are noise here.
    "RAY_DEDUP_LOGS": "0",
    # Ray starts workers at niceness 15; the scheduler and quota actors are on
    # the request path and starve behind anything else on a busy machine.
    "RAY_worker_niceness": "0",
}
T = TypeVar("T")


def _prepare_env() -> None:
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)


def init_local_ray(num_cpus: int, namespace: str, address: str = "") -> None:
    """Starts a Ray head on loopback (or joins `address`). Blocking: call it
    before the event loop starts, or in a thread."""
    _prepare_env()
    import ray

    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=namespace,
             _node_ip_address=LOOPBACK, log_to_driver=False)


def init_ray(cfg: RayConfig) -> None:
    """`init_local_ray` for the `[ray]` section. Blocking."""
    init_local_ray(cfg.num_cpus, cfg.namespace, cfg.address)


def reconnect_ray(cfg: RayConfig) -> None:
    """Drops the driver's session (its cluster is gone) and joins again, or
    starts a new local head. Blocking; raises when Ray is not back yet."""
    shutdown_ray()
    init_ray(cfg)


def named_actors() -> set[str]:
    """Names of the live named actors in this driver's namespace. Blocking."""
    import ray

    return set(ray.util.list_named_actors())


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


async def in_daemon_thread(call: Callable[[], T]) -> T:
    """Runs a blocking Ray call off the event loop. A daemon thread, not the
    loop's executor: a call into a cluster that is gone can take tens of
    seconds, and must not hold the process's exit (the executor's threads
    are joined when the loop closes)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        # The loop may be closed by now (the process is stopping): nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="ray-call", daemon=True).start()
    return await done
