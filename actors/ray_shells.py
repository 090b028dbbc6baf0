"""Thin Ray actors hosting the asyncio services. Each starts its service on
the actor's own event loop when created, and again after a Ray restart."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Protocol

import msgspec
import ray

from actors.quota import QuotaService
from actors.replica_agent import ReplicaAgent
from actors.scheduler import SchedulerService
from analytics.metering import MeteringService
from analytics.webhooks import WebhookService
from scheduler.config import Config, config_from_json, configure_logging
from scheduler.wire import ReplicaInfo


class Service(Protocol):
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class _Host:
    def __init__(self, service: Service, cfg: Config) -> None:
        configure_logging(cfg)
        self._service = service
        # Ray runs an async actor's __init__ on the actor's running loop.
        self._started = asyncio.get_running_loop().create_task(service.start())

    async def ready(self) -> bool:
        """Returns once the service is serving; raises why it could not start."""
        await asyncio.shield(self._started)
        return True

    async def stats(self) -> dict[str, Any]:
        return self._service.stats()

    async def pid(self) -> int:
        """Its process: a driver that attached tells it from a re-created twin."""
        return os.getpid()

    async def stop(self) -> None:
        await self._service.aclose()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor(_Host):
    """One of `scheduler.actors`; `actor_id` (its Ray name) tells its placement
    broadcasts from its peers'."""

    def __init__(self, config_json: bytes, actor_id: str = "", metrics_port: int = 0) -> None:
        cfg = config_from_json(config_json)
        super().__init__(SchedulerService(cfg, actor_id=actor_id, metrics_port=metrics_port),
                         cfg)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MeteringActor(_Host):
    def __init__(self, config_json: bytes) -> None:
        cfg = config_from_json(config_json)
        super().__init__(MeteringService(cfg), cfg)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class QuotaShardActor(_Host):
    """Quota shard `shard` of `quota.shards`: owns the ledgers of the tenants
    hashed onto it; restarted by Ray, it reads them back from Redis."""

    def __init__(self, config_json: bytes, shard: int) -> None:
        cfg = config_from_json(config_json)
        super().__init__(QuotaService(cfg, shard), cfg)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class WebhookActor(_Host):
    """Started only when `webhooks.url` is set."""

    def __init__(self, config_json: bytes) -> None:
        cfg = config_from_json(config_json)
        super().__init__(WebhookService(cfg), cfg)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ReplicaAgentActor(_Host):
    """One per replica; `replica_json` is its ReplicaInfo. The SUB socket binds on
    the actor's node, so place the actor on the replica's node."""

    def __init__(self, config_json: bytes, replica_json: bytes, kv_topic: str | None = None,
                 kv_bind_endpoint: str = "tcp://127.0.0.1:*", kv_replay_endpoint: str = "") -> None:
        # Ray pickles these methods by value, globals included: no Decoder
        # objects here (they cannot be pickled).
        cfg = config_from_json(config_json)
        self._agent = ReplicaAgent(
            cfg, msgspec.json.decode(replica_json, type=ReplicaInfo),
            kv_topic=kv_topic, kv_bind_endpoint=kv_bind_endpoint,
            kv_replay_endpoint=kv_replay_endpoint)
        super().__init__(self._agent, cfg)

    async def kv_events_endpoint(self) -> str:
        """Where the replica's KV-event publisher must connect ("" without a relay)."""
        await asyncio.shield(self._started)
        return self._agent.kv_events_endpoint
