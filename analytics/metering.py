"""MeteringService: usage events from the JetStream usage stream into
ClickHouse, each request id once, and answers to usage queries over NATS.

Plain asyncio, so a Ray async actor can host it. The store lives in a child
process of its own (analytics/store_process.py): clickhouse-connect has no
async client, chDB is one engine per process that must never be driven from
the loop, and in a thread its inserts and the loop starved each other of the
GIL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import nats
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from actors.bus import connect_bus
from actors.control_store import connect_redis
from actors.tasks import cancel_and_wait
from analytics.billing_queries import BillingQueries
from analytics.pricing import PriceReader
from analytics.pull_connection import Frame, PullConnection
from analytics.store import UsageStore
from analytics.store_process import StoreProcess
from analytics.usage_consumer import COUNTERS, UsageConsumer
from analytics.usage_pull import BatchPuller
from scheduler.config import Config
from scheduler.wire import (
    USAGE_DEAD_LETTER_SUBJECT,
    USAGE_QUERY_SUBJECT,
    USAGE_SUBJECTS,
    UsageReply,
    encode,
    usage_query_decoder,
)

log = logging.getLogger("switchyard.metering")

CONSUMER_NAME = "yard-metering"
# One answer per query even if several metering services share a server.
QUERY_QUEUE = "yard-metering"
# JetStream's "stream name already in use with a different configuration".
_STREAM_EXISTS_ERR_CODE = 10058

T = TypeVar("T")


class MeteringService:
    # The store process's main module (StoreProcess).
    store_module = "analytics.store_process"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._store: StoreProcess | None = None
        self._redis: aioredis.Redis | None = None
        self._nc: nats.NATS | None = None
        self._sub: BatchPuller | None = None
        self._usage: UsageConsumer | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._counts = {"queries": 0, "query_failures": 0}

    async def start(self) -> None:
        """Opens and migrates the store, ensures the streams and the consumer,
        then consumes."""
        try:
            self._store = StoreProcess(self.cfg.metering.clickhouse, self.cfg.var_dir,
                                       self.store_module)
            await self._with_store(migrate)
            self._redis = connect_redis(self.cfg.redis)
            self._nc = await connect_bus(self.cfg.nats, "switchyard-metering")
            js = self._nc.jetstream(timeout=self.cfg.nats.request_timeout_s)
            await self._ensure_streams(js)
            self._sub = await self._subscribe(js)
            await self._nc.subscribe(USAGE_QUERY_SUBJECT, queue=QUERY_QUEUE, cb=self._on_query)
            await BillingQueries(self._with_store, self._counts).subscribe(self._nc)
            await self._nc.flush(timeout=self.cfg.nats.request_timeout_s)
        except BaseException:
            await self.aclose()
            raise
        self._usage = UsageConsumer(self.cfg.metering, js, self._sub,
                                    self._with_store, PriceReader(self._redis))
        self._consumer = asyncio.create_task(self._usage.run_forever(), name="metering-consume")

    async def aclose(self) -> None:
        """Stops consuming, drains NATS (in-flight queries finish), closes the store."""
        if self._consumer is not None:
            await cancel_and_wait([self._consumer])
            self._consumer = None
        cancelled = await self._close_nats()
        try:
            if self._redis is not None:
                redis, self._redis = self._redis, None
                await redis.aclose()
        finally:
            # Kept (closed) for stats(); a call after this raises.
            if self._store is not None:
                await self._store.aclose()
        if cancelled:
            raise asyncio.CancelledError

    async def _close_nats(self) -> bool:
        """Drains the connection; True if a cancellation arrived meanwhile, which
        nats-py's drain swallows, so aclose can raise it after the cleanup."""
        nc, self._nc = self._nc, None
        sub, self._sub = self._sub, None
        if nc is None or nc.is_closed:
            return False
        if sub is not None:
            # Its unacked messages come back after ack_wait.
            await sub.aclose()
        task = asyncio.current_task()
        cancels_before = task.cancelling() if task is not None else 0
        await nc.drain()
        return task is not None and task.cancelling() > cancels_before

    def stats(self) -> dict[str, int]:
        """Counters since start. `received` counts deliveries (repeats included),
        `already_stored` redeliveries found stored (their ack was lost),
        `dead_letters` events moved to the dead-letter stream, `unpriced`
        events stored at cost 0 because their model had no price."""
        consumed = self._usage.counts if self._usage else dict.fromkeys(COUNTERS, 0)
        starts = self._store.starts if self._store else 0
        return {**consumed, **self._counts, "store_process_starts": starts}

    async def _with_store(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(store, *args) in the store process; fn must be module-level."""
        assert self._store is not None
        return await self._store.call(fn, *args)

    async def _ensure_streams(self, js: JetStreamContext) -> None:
        await self._ensure_stream(js, StreamConfig(
            name=self.cfg.nats.usage_stream, subjects=[USAGE_SUBJECTS],
            duplicate_window=self.cfg.nats.duplicate_window_s, storage=StorageType.FILE))
        await self._ensure_stream(js, StreamConfig(
            name=self.cfg.metering.dead_letter_stream, subjects=[USAGE_DEAD_LETTER_SUBJECT],
            duplicate_window=self.cfg.nats.duplicate_window_s, storage=StorageType.FILE))

    @staticmethod
    async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_EXISTS_ERR_CODE:
                raise
            await js.update_stream(config)

    async def _subscribe(self, js: JetStreamContext) -> BatchPuller:
        m = self.cfg.metering
        config = ConsumerConfig(
            durable_name=CONSUMER_NAME, name=CONSUMER_NAME, filter_subject=USAGE_SUBJECTS,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=m.ack_wait_s,
            # Unbounded: while the store is away every event must wait, not be
            # dropped. UsageConsumer bounds the deliveries of an event the
            # store refuses, and dead-letters it visibly.
            max_deliver=-1,
            # The server default (1000) would cap every fetch below batch_max;
            # twice leaves room for a batch waiting on redelivery.
            max_ack_pending=2 * m.batch_max)
        # Creates the durable consumer, or updates it to the configured settings.
        await js.add_consumer(self.cfg.nats.usage_stream, config)
        assert self._nc is not None
        url = self.cfg.nats.url

        async def connect(on_frames: Callable[[list[Frame]], None]) -> PullConnection:
            return await PullConnection.connect(url, "switchyard-metering-pull", on_frames)

        puller = BatchPuller(connect, self.cfg.nats.usage_stream, CONSUMER_NAME, m.batch_max,
                             expires_s=m.fetch_wait_s, linger_s=m.linger_s)
        await puller.start()
        return puller

    async def _on_query(self, msg: Msg) -> None:
        self._counts["queries"] += 1
        store = self._store
        assert store is not None
        try:
            query = usage_query_decoder.decode(msg.data)
            reply = UsageReply(totals=await store.call(UsageStore.totals, query.tenant_id))
        except msgspec.DecodeError as exc:
            self._counts["query_failures"] += 1
            reply = UsageReply(error=f"bad usage query: {exc}")
        except Exception as exc:
            self._counts["query_failures"] += 1
            log.warning("usage query failed", exc_info=True)
            reply = UsageReply(error=f"usage query failed: {exc}")
        if msg.reply:
            await msg.respond(encode(reply))


def migrate(store: UsageStore) -> list[int]:
    """In the store process at start: the schema, before anything is consumed."""
    return store.migrate()
