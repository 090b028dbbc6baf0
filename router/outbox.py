"""Outgoing notices at the end of each request, published off the request's
path by owned tasks: usage events to JetStream (Nats-Msg-Id = request id,
so a repeated publish is stored once) and completion notices to schedulers.

A usage event JetStream does not take at once (NATS away, no ack within the
timeout) goes to the disk spool (router/spool.py); one task publishes the
spooled events, oldest first, as soon as NATS is back, and deletes each one
after its ack. While the spool is full the gateway refuses requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from router.metrics import Metrics
from router.spool import UsageSpool
from scheduler.wire import DONE_SUBJECT, PlaceDone, UsageEvent, encode, usage_subject

log = logging.getLogger("switchyard.outbox")
RETRY_DELAY_S = 0.5
# Publishers working the usage queue at once: a JetStream publish waits for its ack.
PUBLISHERS = 4
# Events moved to the spool in one transaction, and published from it per round.
SPOOL_BATCH_EVENTS = 256


class Outbox:
    """Two queues: completion notices never wait behind usage events."""

    def __init__(self, nc: NATS, js: JetStreamContext, capacity: int,
                 publish_timeout_s: float, metrics: Metrics, spool: UsageSpool) -> None:
        self._nc = nc
        self._js = js
        self._timeout_s = publish_timeout_s
        self._metrics = metrics
        self._spool = spool
        self._usage: asyncio.Queue[UsageEvent] = asyncio.Queue(capacity)
        self._done: asyncio.Queue[PlaceDone] = asyncio.Queue(capacity)
        self._spooled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._publish_usage(), name=f"outbox-usage-{i}")
                       for i in range(PUBLISHERS)]
        self._tasks.append(asyncio.create_task(self._publish_done(), name="outbox-done"))
        self._tasks.append(asyncio.create_task(self._drain_spool(), name="outbox-spool"))

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Publishes what is queued (bounded by the timeout), spools the rest, stops."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(self._usage.join(), self._done.join()),
                                   timeout=drain_timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        left = [self._usage.get_nowait() for _ in range(self._usage.qsize())]
        if left:
            await self._spool.put(left)
            log.warning("usage events spooled at shutdown: %d", len(left))

    def spool_full(self) -> bool:
        return self._spool.full()

    def request_done(self, done: PlaceDone, usage: UsageEvent | None) -> None:
        """Never blocks: safe in a `finally` of a cancelled handler. `usage`
        None: the request is not billed (no replica accepted it)."""
        self.placement_done(done)
        if usage is None:
            return
        try:
            self._usage.put_nowait(usage)
        except asyncio.QueueFull:
            self._metrics.usage_dropped.inc()
            log.error("outbox full, usage event dropped: %s", usage.request_id)

    def placement_done(self, done: PlaceDone) -> None:
        """Releases a placement the scheduler counted (also one never used)."""
        try:
            self._done.put_nowait(done)
        except asyncio.QueueFull:
            # The scheduler forgets the placement after its TTL anyway.
            self._metrics.nats_errors.inc()

    async def _publish_done(self) -> None:
        while True:
            done = await self._done.get()
            try:
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(DONE_SUBJECT, encode(done))
            finally:
                self._done.task_done()

    async def _publish_usage(self) -> None:
        while True:
            events = [await self._usage.get()]
            try:
                if self._nc.is_connected and await self._publish(events[0]):
                    continue
                # NATS is away: what is queued behind goes to disk with it.
                while len(events) < SPOOL_BATCH_EVENTS and not self._usage.empty():
                    events.append(self._usage.get_nowait())
                await self._to_spool(events)
            finally:
                for _ in events:
                    self._usage.task_done()

    async def _to_spool(self, events: list[UsageEvent]) -> None:
        try:
            await self._spool.put(events)
        except Exception:
            self._metrics.usage_dropped.inc(len(events))
            log.exception("usage spool write failed, %d events lost", len(events))
            return
        self._spooled.set()

    async def _publish(self, event: UsageEvent) -> bool:
        """True once JetStream acked it."""
        try:
            await self._js.publish(usage_subject(event.tenant_id), encode(event),
                                   timeout=self._timeout_s,
                                   headers={"Nats-Msg-Id": event.request_id})
        except (TimeoutError, nats.errors.Error) as exc:
            # It may have landed all the same: the spool's copy is deduplicated.
            self._metrics.nats_errors.inc()
            log.warning("usage publish failed, spooling: %r", exc)
            return False
        self._metrics.usage_published.inc()
        return True

    async def _drain_spool(self) -> None:
        """Publishes spooled events, oldest first, whenever NATS is there."""
        while True:
            if self._spool.depth_events == 0:
                self._spooled.clear()
                await self._spooled.wait()
            if not self._nc.is_connected:
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            events = await self._spool.oldest(SPOOL_BATCH_EVENTS)
            acked = await asyncio.gather(*(self._publish(event) for event in events))
            await self._spool.delete([event.request_id for event, ok
                                      in zip(events, acked, strict=True) if ok])
            if not all(acked):
                await asyncio.sleep(RETRY_DELAY_S)
