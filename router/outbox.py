"""Outgoing notices at the end of each request, published off the request's
path by owned tasks: usage events to JetStream (Nats-Msg-Id = request id,
so a repeated publish is stored once), the events queued at that moment
published together with their acks awaited together (router/batch_publish.py),
and completion notices to schedulers, all those queued in one go.

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

from router.batch_publish import BatchPublisher
from router.metrics import Metrics
from router.spool import UsageSpool
from scheduler.wire import DONE_SUBJECT, PlaceDone, UsageEvent, encode, usage_subject

log = logging.getLogger("switchyard.outbox")
RETRY_DELAY_S = 0.5
# Publishers working the usage queue at once: each waits for its batch's acks.
PUBLISHERS = 4
# Events published together (and moved to the spool in one transaction, and
# published from it per round).
SPOOL_BATCH_EVENTS = 256


class Outbox:
    """Two queues: completion notices never wait behind usage events."""

    def __init__(self, nc: NATS, capacity: int, publish_timeout_s: float, metrics: Metrics,
                 spool: UsageSpool) -> None:
        self._nc = nc
        self._publisher = BatchPublisher(nc)
        self._timeout_s = publish_timeout_s
        self._metrics = metrics
        self._spool = spool
        self._usage: asyncio.Queue[UsageEvent] = asyncio.Queue(capacity)
        self._done: asyncio.Queue[PlaceDone] = asyncio.Queue(capacity)
        self._spooled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._publisher.start()
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
        await self._publisher.aclose()
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
            notices = [await self._done.get()]
            # Those queued meanwhile go in the same socket write.
            while not self._done.empty():
                notices.append(self._done.get_nowait())
            try:
                with contextlib.suppress(nats.errors.Error):
                    for done in notices:
                        await self._nc.publish(DONE_SUBJECT, encode(done))
            finally:
                for _ in notices:
                    self._done.task_done()

    async def _publish_usage(self) -> None:
        while True:
            events = [await self._usage.get()]
            while len(events) < SPOOL_BATCH_EVENTS and not self._usage.empty():
                events.append(self._usage.get_nowait())
            try:
                # NATS away: the batch goes to disk as it is.
                failed = (await self._publish(events)) if self._nc.is_connected else events
                if failed:
                    await self._to_spool(failed)
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

    async def _publish(self, events: list[UsageEvent]) -> list[UsageEvent]:
        """The events JetStream did not ack in time (they may have landed all
        the same: the spool's copy is deduplicated)."""
        acked = await self._publisher.publish(
            [(usage_subject(e.tenant_id), encode(e), e.request_id) for e in events],
            self._timeout_s)
        failed = [event for event, ok in zip(events, acked, strict=True) if not ok]
        if failed:
            self._metrics.nats_errors.inc(len(failed))
            log.warning("usage publish not acked, spooling %d of %d events",
                        len(failed), len(events))
        if len(failed) < len(events):
            self._metrics.usage_published.inc(len(events) - len(failed))
        return failed

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
            failed = {event.request_id for event in await self._publish(events)}
            await self._spool.delete([event.request_id for event in events
                                      if event.request_id not in failed])
            if failed:
                await asyncio.sleep(RETRY_DELAY_S)
