"""The scheduler's I/O shell around the pure SchedulerCore: serves placement
requests over NATS, and keeps the core's view of the replicas current from
the registry, the agents' load snapshots and their relayed KV-cache events.
Hosted by a Ray actor (actors/ray_shells.py); plain asyncio here so it can be
tested on its own."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.bus import connect_bus
from actors.control_store import ReplicaRegistry, connect_redis
from scheduler.config import Config
from scheduler.core import SchedulerCore
from scheduler.kv_events import AllBlocksCleared, decode_batch
from scheduler.wire import (
    DONE_SUBJECT,
    KV_SUBJECT,
    LOAD_SUBJECT,
    MODELS_SUBJECT,
    PLACE_QUEUE,
    PLACE_SUBJECT,
    REGISTRY_CHANGED_SUBJECT,
    KvResync,
    ModelsReply,
    done_decoder,
    encode,
    kv_decoder,
    load_decoder,
    place_request_decoder,
)

log = logging.getLogger("switchyard.scheduler")
# One placement in this many is logged with every candidate's scores.
EXPLAIN_EVERY = 100


class SchedulerService:
    def __init__(self, cfg: Config, rng: random.Random | None = None,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock_s = clock_s
        self.core = SchedulerCore(cfg.scheduler, rng or random.Random(), cfg.models)
        self.counts = dict.fromkeys(("placed", "load_reports", "kv_batches", "kv_resyncs",
                                     "unknown_replica", "malformed"), 0)
        self._nc: NATS | None = None
        self._registry: ReplicaRegistry | None = None
        self._timers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._nc = await connect_bus(self.cfg.nats, "switchyard-scheduler")
        self._registry = ReplicaRegistry(connect_redis(self.cfg.redis))
        await self.reload_registry()
        nc = self._nc
        await nc.subscribe(PLACE_SUBJECT.format(model="*"), queue=PLACE_QUEUE, cb=self._on_place)
        await nc.subscribe(MODELS_SUBJECT, queue=PLACE_QUEUE, cb=self._on_models)
        await nc.subscribe(DONE_SUBJECT, cb=self._on_done)
        await nc.subscribe(REGISTRY_CHANGED_SUBJECT, cb=self._on_registry_changed)
        # Every scheduler actor hears every replica: their views stay alike.
        await nc.subscribe(LOAD_SUBJECT.format(model="*"), cb=self._on_load)
        await nc.subscribe(KV_SUBJECT.format(model="*", replica="*"), cb=self._on_kv)
        await nc.flush()
        self._timers = [
            asyncio.create_task(self._refresh_forever(), name="registry-refresh"),
            asyncio.create_task(self._staleness_forever(), name="load-staleness")]

    async def aclose(self) -> None:
        for timer in self._timers:
            timer.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
        if self._nc is not None:
            await self._nc.drain()
        if self._registry is not None:
            await self._registry.redis.aclose()

    async def reload_registry(self) -> None:
        assert self._registry is not None
        self.core.set_replicas(await self._registry.replicas())

    def stats(self) -> dict[str, int]:
        return {"replicas": len(self.core.replicas), "in_flight": self.core.in_flight_count(),
                **self.counts, **{f"index_{k}": v for k, v in self.core.index_sizes().items()}}

    async def _staleness_forever(self) -> None:
        stale_s = self.cfg.scheduler.load_stale_s
        while True:
            await asyncio.sleep(stale_s / 2)
            for replica_id in self.core.mark_stale(self.clock_s(), stale_s):
                log.warning("replica %s: no load report for %.1f s, taken as unhealthy",
                            replica_id, stale_s)

    async def _refresh_forever(self) -> None:
        # Backstop for a missed "registry changed" notice.
        while True:
            await asyncio.sleep(self.cfg.scheduler.registry_refresh_s)
            await self._reload_or_keep()

    async def _on_place(self, msg: Msg) -> None:
        try:
            req = place_request_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._malformed("placement request")
            return
        decision = self.core.place(req, self.clock_s())
        self.counts["placed"] += 1
        if self.counts["placed"] % EXPLAIN_EVERY == 1:
            log.info("placement %s", msgspec.json.encode(self.core.explain_last()).decode())
        await msg.respond(encode(decision))

    async def _on_done(self, msg: Msg) -> None:
        try:
            self.core.done(done_decoder.decode(msg.data).request_id)
        except msgspec.DecodeError:
            self._malformed("completion notice")

    async def _on_load(self, msg: Msg) -> None:
        try:
            snap = load_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._malformed("load snapshot")
            return
        capacity = snap.cache.num_gpu_blocks if snap.cache else None
        known = self.core.apply_load(snap.replica_id, snap.running, snap.waiting,
                                     snap.kv_cache_usage, self.clock_s(), capacity)
        self.core.set_health(snap.replica_id, healthy=snap.healthy, draining=snap.draining)
        self.counts["load_reports" if known else "unknown_replica"] += 1

    async def _on_kv(self, msg: Msg) -> None:
        try:
            relay = kv_decoder.decode(msg.data)
            # A resync means events were lost: forget the replica's cache.
            events = ([AllBlocksCleared()] if isinstance(relay, KvResync)
                      else decode_batch(relay.payload).events)
        except msgspec.DecodeError:
            self._malformed("KV-event relay")
            return
        known = self.core.apply_kv_events(relay.replica_id, events)
        kind = "kv_resyncs" if isinstance(relay, KvResync) else "kv_batches"
        self.counts[kind if known else "unknown_replica"] += 1

    def _malformed(self, what: str) -> None:
        self.counts["malformed"] += 1
        log.warning("malformed %s dropped", what)

    async def _on_models(self, msg: Msg) -> None:
        await msg.respond(encode(ModelsReply(models=self.core.models())))

    async def _on_registry_changed(self, msg: Msg) -> None:
        await self._reload_or_keep()

    async def _reload_or_keep(self) -> None:
        try:
            await self.reload_registry()
        except Exception:
            # Keep serving with the last registry; the next change notice or
            # the periodic refresh tries again.
            log.warning("registry reload failed", exc_info=True)
