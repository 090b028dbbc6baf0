"""Outgoing notices at the end of each request, published off the request's
path by one owned task: usage events to JetStream (Nats-Msg-Id = request id,
so a retried publish is stored once) and completion notices to schedulers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from router.metrics import Metrics
from scheduler.wire import DONE_SUBJECT, PlaceDone, UsageEvent, encode, usage_subject

log = logging.getLogger("switchyard.outbox")
RETRY_DELAY_S = 0.5
# Publishers working the usage queue at once: a JetStream publish waits for its ack.
PUBLISHERS = 4


class Outbox:
    """Two queues: completion notices never wait behind usage events, whose
    publishes may be retried for as long as JetStream is away."""

    def __init__(self, nc: NATS, js: JetStreamContext, capacity: int,
                 publish_timeout_s: float, metrics: Metrics) -> None:
        self._nc = nc
        self._js = js
        self._timeout_s = publish_timeout_s
        self._metrics = metrics
        self._usage: asyncio.Queue[UsageEvent] = asyncio.Queue(capacity)
        self._done: asyncio.Queue[PlaceDone] = asyncio.Queue(capacity)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._publish_usage(), name=f"outbox-usage-{i}")
                       for i in range(PUBLISHERS)]
        self._tasks.append(asyncio.create_task(self._publish_done(), name="outbox-done"))

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Publishes what is queued (bounded by the timeout), then stops."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(self._usage.join(), self._done.join()),
                                   timeout=drain_timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._usage.empty():
            log.error("usage events not published at shutdown: %d", self._usage.qsize())

    def request_done(self, done: PlaceDone, usage: UsageEvent) -> None:
        """Never blocks: safe in a `finally` of a cancelled handler."""
        self.placement_done(done)
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
            usage = await self._usage.get()
            try:
                await self._publish(usage)
            finally:
                self._usage.task_done()

    async def _publish(self, event: UsageEvent) -> None:
        payload = encode(event)
        headers = {"Nats-Msg-Id": event.request_id}
        while True:
            try:
                await self._js.publish(usage_subject(event.tenant_id), payload,
                                       timeout=self._timeout_s, headers=headers)
                self._metrics.usage_published.inc()
                return
            except (TimeoutError, nats.errors.Error) as exc:
                # The same Nats-Msg-Id makes the retry safe if the first one landed.
                self._metrics.nats_errors.inc()
                log.warning("usage publish failed, retrying: %r", exc)
                await asyncio.sleep(RETRY_DELAY_S)
