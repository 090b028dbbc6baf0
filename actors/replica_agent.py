"""One replica's agent: checks its health, scrapes its /metrics several times
a second and publishes LoadSnapshots on `yard.replica.load.<model>`, keeps its
registry entry present (re-registering it after a restart, unless an operator
removed it), refuses precise mode when the replica's KV-cache layout is not
the configured one, and relays its KV events (actors/kv_relay.py).

Plain asyncio so it can be tested on its own; hosted by ReplicaAgentActor
(actors/ray_shells.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from redis.exceptions import RedisError

from actors.bus import connect_bus
from actors.control_store import ReplicaRegistry, connect_redis
from actors.kv_relay import LOOPBACK_ANY_PORT, KvRelay
from scheduler.config import Config, model_config
from scheduler.replica_metrics import ReplicaMetrics, parse_metrics, precise_mode_error
from scheduler.wire import (
    REGISTRY_CHANGED_SUBJECT,
    LoadSnapshot,
    RegistryChanged,
    ReplicaInfo,
    encode,
    load_subject,
)

log = logging.getLogger("switchyard.replica_agent")

_WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")


class ReplicaAgent:
    """`replica` is the registry entry to keep present; `kv_topic` the topic its
    vLLM publishes KV events under (None: no relay); `kv_replay_endpoint` its
    replay socket ("": ask the replica's /kv_event_sources)."""

    def __init__(self, cfg: Config, replica: ReplicaInfo, *, kv_topic: str | None = None,
                 kv_bind_endpoint: str = LOOPBACK_ANY_PORT, kv_replay_endpoint: str = "",
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.cfg = cfg
        self.replica = replica
        self.healthy = False
        self.draining = replica.draining
        self.metrics = ReplicaMetrics()
        self.precise_error = ""
        self.counters: dict[str, int] = dict.fromkeys(
            ("snapshots_published", "scrape_errors", "health_failures", "registrations",
             "step_failures"), 0)
        self._clock_ms = clock_ms
        self._static_replay = kv_replay_endpoint
        self._nc: NATS | None = None
        self._registry: ReplicaRegistry | None = None
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.relay = None if kv_topic is None else KvRelay(
            cfg.agent, replica.id, replica.models[0], kv_topic, self._publish,
            self._lookup_replay, kv_bind_endpoint)

    @property
    def kv_events_endpoint(self) -> str:
        """Where the replica's PUB socket must connect (after start())."""
        return "" if self.relay is None else self.relay.endpoint

    async def start(self) -> None:
        self._nc = await connect_bus(self.cfg.nats, f"switchyard-agent-{self.replica.id}")
        self._registry = ReplicaRegistry(connect_redis(self.cfg.redis))
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.agent.http_timeout_s))
        if self.relay is not None:
            self.relay.bind()
        # The relay's receive is pending as soon as this task first runs: no await before it.
        self._task = asyncio.create_task(self._run(), name=f"agent-{self.replica.id}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.relay is not None:
            self.relay.close()
        if self._http is not None:
            await self._http.close()
        if self._nc is not None:
            await self._nc.drain()
        if self._registry is not None:
            await self._registry.redis.aclose()

    def stats(self) -> dict[str, Any]:
        relay = {} if self.relay is None else {"kv": self.relay.stats()}
        return {**self.counters, **relay, "replica_id": self.replica.id,
                "healthy": self.healthy, "draining": self.draining,
                "precise_error": self.precise_error}

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            if self.relay is not None:
                group.create_task(self.relay.run(), name=f"kv-{self.replica.id}")
            group.create_task(self._every(self.cfg.agent.health_interval_s, self._check_health))
            group.create_task(self._every(self.cfg.agent.scrape_interval_s, self._scrape))

    async def _every(self, interval_s: float, step: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started_s = loop.time()
            try:
                await step()
            except (aiohttp.ClientError, TimeoutError, OSError, RedisError,
                    nats.errors.Error) as exc:
                # Redis or NATS away for a while: keep checking, they come back.
                self.counters["step_failures"] += 1
                log.warning("replica %s: %s failed: %r", self.replica.id, step.__name__, exc)
            except Exception:
                # Anything else (a garbled answer) must not end the agent
                # silently while its last snapshot says "healthy".
                self.counters["step_failures"] += 1
                log.exception("replica %s: %s failed", self.replica.id, step.__name__)
            await asyncio.sleep(max(0.0, interval_s - (loop.time() - started_s)))

    async def _check_health(self) -> None:
        assert self._http is not None
        try:
            async with self._http.get(self.replica.url + "/health") as resp:
                healthy = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if not healthy:
            self.counters["health_failures"] += 1
        if healthy != self.healthy:
            log.info("replica %s is %s", self.replica.id, "healthy" if healthy else "unhealthy")
        self.healthy = healthy
        await self._sync_registry()

    async def _sync_registry(self) -> None:
        """Reads the operator's draining flag; re-registers the replica while it is
        healthy and missing from the registry (Redis restarted, entry lost),
        unless an operator removed it."""
        assert self._registry is not None and self._nc is not None
        entry = await self._registry.replica(self.replica.id)
        if entry is not None:
            self.draining = entry.draining
            return
        if not self.healthy or await self._registry.is_removed(self.replica.id):
            return
        info = msgspec.structs.replace(self.replica, draining=self.draining)
        if await self._registry.register_if_absent(info):
            self.counters["registrations"] += 1
            log.info("replica %s registered again", self.replica.id)
            await self._nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))

    async def _scrape(self) -> None:
        assert self._http is not None
        try:
            async with self._http.get(self.replica.url + "/metrics") as resp:
                resp.raise_for_status()
                text = await resp.text()
            self.metrics = parse_metrics(text)
            scraped = True
        except (aiohttp.ClientError, TimeoutError):
            self.counters["scrape_errors"] += 1
            scraped = False
        if scraped:
            await self._check_cache_config()
        for model in self.replica.models:
            await self._publish(load_subject(model), encode(
                self._snapshot(model, healthy=self.healthy and scraped)))
            self.counters["snapshots_published"] += 1

    async def _check_cache_config(self) -> None:
        # A vLLM server serves one model.
        model = self.replica.models[0]
        error = precise_mode_error(self.metrics.cache, model, model_config(self.cfg, model))
        if error == self.precise_error:
            return
        if error:
            log.error("replica %s: precise prefix scoring refused: %s", self.replica.id, error)
        else:
            log.info("replica %s: cache config now matches; precise scoring allowed",
                     self.replica.id)
        self.precise_error = error
        if self.relay is not None:
            await self.relay.refuse(error)

    def _snapshot(self, model: str, *, healthy: bool) -> LoadSnapshot:
        m = self.metrics
        return LoadSnapshot(
            replica_id=self.replica.id, model=model, running=m.running, waiting=m.waiting,
            kv_cache_usage=m.kv_cache_usage,
            prefix_cache_queries_tokens=m.prefix_cache_queries_tokens,
            prefix_cache_hits_tokens=m.prefix_cache_hits_tokens, healthy=healthy,
            draining=self.draining, cache=m.cache, precise_error=self.precise_error,
            taken_at_ms=self._clock_ms())

    async def _publish(self, subject: str, payload: bytes) -> None:
        # nats-py only appends to its write buffer here; the flusher task does the I/O.
        assert self._nc is not None
        await self._nc.publish(subject, payload)

    async def _lookup_replay(self) -> str:
        """The replay endpoint from the replica's /kv_event_sources ("" if none)."""
        if self._static_replay or self._http is None:
            return self._static_replay
        try:
            async with self._http.get(self.replica.url + "/kv_event_sources") as resp:
                resp.raise_for_status()
                sources = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return ""
        source = sources.get("0") if isinstance(sources, dict) else None
        endpoint = source.get("replay_endpoint") if isinstance(source, dict) else None
        return _reachable(endpoint, self.replica.url) if isinstance(endpoint, str) else ""


def _reachable(endpoint: str, replica_url: str) -> str:
    """A bound endpoint (`tcp://*:5557`) as reachable at the replica's host."""
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp" and parts.hostname in (*_WILDCARD_HOSTS, None):
        return f"tcp://{urlsplit(replica_url).hostname}:{parts.port}"
    return endpoint
