"""Starting and joining Ray, kept on loopback.

Ray binds the machine's network address unless told otherwise; local-only
mode (set before ray is imported) keeps GCS, raylet and workers on 127.0.0.1.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's deduplicated log streaming and its rich console are noise here.
    "RAY_DEDUP_LOGS": "0",
}


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


def shutdown_ray() -> None:
    import ray

    ray.shutdown()
