"""The scheduler's I/O shell around the pure SchedulerCore: serves placement
requests over NATS, and keeps the core's view of the replicas current from
the registry, the agents' load snapshots and their relayed KV-cache events.
Hosted by a Ray actor (actors/ray_shells.py); plain asyncio here so it can be
tested on its own.

Several actors serve one queue group. Each broadcasts the placements it makes
(PEER_PLACED_SUBJECT) and counts the ones its peers make, and all hear the
same load reports, KV events and completion notices, so their views agree;
when one dies, the others already count its requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable

import msgspec
import nats.errors
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from actors.bus import connect_bus
from actors.control_store import ReplicaRegistry, connect_redis
from actors.sched_metrics import serve_metrics
from scheduler.config import Config
from scheduler.core import SchedulerCore, peer_placed
from scheduler.kv_events import AllBlocksCleared, decode_batch
from scheduler.waiting_room import Reply, WaitingRoom
from scheduler.wire import (
    DONE_SUBJECT,
    KV_SUBJECT,
    LOAD_SUBJECT,
    MODELS_SUBJECT,
    PEER_PLACED_SUBJECT,
    PLACE_QUEUE,
    PLACE_SUBJECT,
    REGISTRY_CHANGED_SUBJECT,
    REPLICA_FAILED_SUBJECT,
    KvResync,
    ModelsReply,
    Placement,
    PlaceQueued,
    PlaceRejected,
    PlaceRequest,
    done_decoder,
    encode,
    kv_decoder,
    load_decoder,
    peer_placed_decoder,
    place_request_decoder,
    replica_failed_decoder,
)

log = logging.getLogger("switchyard.scheduler")
# One placement in this many is logged with every candidate's scores.
EXPLAIN_EVERY = 100


class SchedulerService:
    def __init__(self, cfg: Config, rng: random.Random | None = None,
                 clock_s: Callable[[], float] = time.monotonic, actor_id: str = "",
                 metrics_port: int = 0) -> None:
        """`metrics_port`: where this actor serves its Prometheus metrics; 0: nowhere."""
        self.cfg = cfg
        self.metrics_port = metrics_port
        self.clock_s = clock_s
        # Tells this actor's own broadcasts from its peers'.
        self.actor_id = actor_id or "scheduler-" + uuid.uuid4().hex[:12]
        self.core = SchedulerCore(cfg.scheduler, rng or random.Random(), cfg.models)
        self.room = WaitingRoom(self.core, cfg.scheduler.saturation)
        # Set when a placement starts waiting: its deadline may be the next one.
        self._queued = asyncio.Event()
        self.counts = dict.fromkeys(("placed", "shed", "load_reports", "kv_batches", "kv_resyncs",
                                     "unknown_replica", "malformed", "reply_errors",
                                     "peer_placed", "peer_stale", "ejections"), 0)
        self._nc: NATS | None = None
        self._place_sub: Subscription | None = None
        self._registry: ReplicaRegistry | None = None
        self._timers: list[asyncio.Task[None]] = []
        self._metrics: web.AppRunner | None = None

    async def start(self) -> None:
        if self.metrics_port:
            # First: a taken port fails the start before the actor takes placements.
            self._metrics = await serve_metrics(self.actor_id, self.events, self.sizes,
                                                self.metrics_port)
        # Its own peer broadcasts, one per placement, would only be decoded and dropped.
        self._nc = await connect_bus(self.cfg.nats, self.actor_id, echo=False)
        self._registry = ReplicaRegistry(connect_redis(self.cfg.redis))
        await self.reload_registry()
        nc = self._nc
        self._place_sub = await nc.subscribe(PLACE_SUBJECT.format(model="*"), queue=PLACE_QUEUE,
                                             cb=self._on_place)
        await nc.subscribe(MODELS_SUBJECT, queue=PLACE_QUEUE, cb=self._on_models)
        await nc.subscribe(DONE_SUBJECT, cb=self._on_done)
        await nc.subscribe(PEER_PLACED_SUBJECT, cb=self._on_peer_placed)
        await nc.subscribe(REPLICA_FAILED_SUBJECT, cb=self._on_replica_failed)
        await nc.subscribe(REGISTRY_CHANGED_SUBJECT, cb=self._on_registry_changed)
        # Every scheduler actor hears every replica: their views stay alike.
        await nc.subscribe(LOAD_SUBJECT.format(model="*"), cb=self._on_load)
        await nc.subscribe(KV_SUBJECT.format(model="*", replica="*"), cb=self._on_kv)
        await nc.flush()
        self._timers = [
            asyncio.create_task(self._refresh_forever(), name="registry-refresh"),
            asyncio.create_task(self._staleness_forever(), name="load-staleness"),
            asyncio.create_task(self._deadlines_forever(), name="queue-deadlines")]

    async def aclose(self) -> None:
        for timer in self._timers:
            timer.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
        if self._nc is not None:
            await self._nc.drain()
        if self._registry is not None:
            await self._registry.redis.aclose()
        if self._metrics is not None:
            await self._metrics.cleanup()

    async def reload_registry(self) -> None:
        assert self._registry is not None
        self.core.set_replicas(await self._registry.replicas())

    def stats(self) -> dict[str, int]:
        return {**self.sizes(), **self.events()}

    def sizes(self) -> dict[str, int]:
        """The current size of every bounded part: what a gauge shows."""
        return {"replicas": len(self.core.replicas), "in_flight": self.core.in_flight_count(),
                **{f"in_flight@{rid}": n for rid, n in self.core.in_flight_by_replica().items()},
                **self.room.queue_lengths(),
                **{f"index_{k}": v for k, v in self.core.index_sizes().items()}}

    def events(self) -> dict[str, int]:
        """What happened since the start: what a counter shows."""
        return {**self.counts, **self.room.counts}

    async def _deadlines_forever(self) -> None:
        # One timer for every waiting placement: sleeps until the earliest
        # deadline, or until a new placement starts waiting.
        while True:
            self._queued.clear()
            deadline_s = self.room.next_deadline_s()
            wait_s = None if deadline_s is None else max(0.0, deadline_s - self.clock_s())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._queued.wait()
            await self._send(self.room.expire(self.clock_s()))

    async def _dispatch(self) -> None:
        """Capacity may have freed: places waiting requests that now fit."""
        await self._send(self.room.dispatch(self.clock_s()))

    async def _send(self, replies: list[Reply]) -> None:
        assert self._nc is not None
        for reply in replies:
            try:
                if isinstance(reply.message, Placement):
                    await self.announce(reply.req, reply.message)
                if reply.subject:
                    await self._nc.publish(reply.subject, encode(reply.message))
            except nats.errors.Error:
                # The ingress waits for this answer with a timeout and releases
                # a placement it never heard of; the deadline timer must live on.
                self.counts["reply_errors"] += 1
                log.warning("placement answer to %s lost", reply.subject, exc_info=True)

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
        if self._backlogged():
            await self._shed(req, msg.reply)
            return
        replies = self.room.place(req, msg.reply, self.clock_s())
        self.counts["placed"] += 1
        if self.counts["placed"] % EXPLAIN_EVERY == 1:
            log.info("placement %s", msgspec.json.encode(self.core.explain_last()).decode())
        if any(isinstance(reply.message, PlaceQueued) for reply in replies):
            self._queued.set()
        await self._send(replies)

    def _backlogged(self) -> bool:
        """More placement requests wait behind this one than the actor keeps:
        the oldest (this one, whose ingress is about to resend it) is refused,
        so a flooded actor answers everyone quickly instead of late."""
        limit = self.cfg.scheduler.place_backlog_max
        return bool(limit) and self._place_sub is not None and (
            self._place_sub.pending_msgs > limit)

    async def _shed(self, req: PlaceRequest, reply_to: str) -> None:
        self.counts["shed"] += 1
        await self._send([Reply(reply_to, PlaceRejected(
            request_id=req.request_id, code="scheduler_overloaded",
            message="The scheduler has more placement requests waiting than it keeps.",
            retry_after_s=self.cfg.scheduler.saturation.retry_after_s), req)])

    async def announce(self, req: PlaceRequest, placement: Placement) -> None:
        """Tells the peers about a placement. Sent before the answer on the same
        connection, so through one server a peer hears it before the request can
        have finished (elsewhere the core's memory of done requests covers it)."""
        assert self._nc is not None
        await self._nc.publish(PEER_PLACED_SUBJECT,
                               encode(peer_placed(self.actor_id, req, placement)))

    async def _on_peer_placed(self, msg: Msg) -> None:
        try:
            placed = peer_placed_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._malformed("peer placement")
            return
        if placed.actor_id == self.actor_id:
            return
        fresh = self.core.apply_peer(placed, self.clock_s())
        self.counts["peer_placed" if fresh else "peer_stale"] += 1

    async def _on_done(self, msg: Msg) -> None:
        try:
            done = done_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._malformed("completion notice")
            return
        self.core.done(done.request_id)
        # A notice for a request still waiting: its client left.
        self.room.cancel(done.model, done.request_id)
        await self._dispatch()

    async def _on_replica_failed(self, msg: Msg) -> None:
        try:
            report = replica_failed_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._malformed("replica failure report")
            return
        period_s = self.core.replica_failed(report.replica_id, self.clock_s())
        if period_s is not None:
            self.counts["ejections"] += 1
            log.warning("replica %s ejected for %.1f s: %s", report.replica_id, period_s,
                        report.reason)

    async def _on_load(self, msg: Msg) -> None:
        try:
            snap = load_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._malformed("load snapshot")
            return
        capacity = snap.cache.num_gpu_blocks if snap.cache else None
        known = self.core.apply_load(snap.replica_id, snap.running, snap.waiting,
                                     snap.kv_cache_usage, self.clock_s(), capacity)
        self.core.set_health(snap.replica_id, healthy=snap.healthy, draining=snap.draining,
                             now_s=self.clock_s())
        self.counts["load_reports" if known else "unknown_replica"] += 1
        await self._dispatch()

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
            return
        await self._dispatch()
