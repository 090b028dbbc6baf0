"""MeteringService: usage events from the JetStream usage stream into
ClickHouse, each request id once, and answers to usage queries over NATS.

Plain asyncio, so a Ray async actor can host it. Every store call runs in
one dedicated worker thread: clickhouse-connect has no async client, and
chDB is one engine per process that must never be driven from the loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from actors.bus import connect_bus
from analytics.billing_queries import BillingQueries
from analytics.store import UsageStore, fits_columns, open_store
from scheduler.config import Config
from scheduler.wire import (
    USAGE_QUERY_SUBJECT,
    USAGE_SUBJECTS,
    UsageEvent,
    UsageReply,
    encode,
    usage_decoder,
    usage_query_decoder,
)

log = logging.getLogger("switchyard.metering")

CONSUMER_NAME = "yard-metering"
# One answer per query even if several metering services share a server.
QUERY_QUEUE = "yard-metering"
# JetStream's "stream name already in use with a different configuration".
_STREAM_EXISTS_ERR_CODE = 10058
# A failed insert is retried after this, doubling per delivery up to the cap.
NAK_FIRST_DELAY_S = 0.5
NAK_MAX_DELAY_S = 60.0
# Pause after a consumer error (NATS away, say) so the loop does not spin.
CONSUME_RETRY_S = 1.0

T = TypeVar("T")


def dedup_token(events: Sequence[UsageEvent]) -> str:
    """Same request ids, same token: a redelivered batch inserts nothing."""
    digest = hashlib.sha256()
    for request_id in sorted(e.request_id for e in events):
        digest.update(request_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def insert_batch(store: UsageStore, events: Sequence[UsageEvent]) -> None:
    """Runs in the store thread, so hashing the ids stays off the loop too."""
    store.insert(events, dedup_token(events))


def retry_delay_s(deliveries: int) -> float:
    return min(NAK_MAX_DELAY_S, NAK_FIRST_DELAY_S * 2 ** max(0, deliveries - 1))


class MeteringService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._executor: ThreadPoolExecutor | None = None
        self._store: UsageStore | None = None
        self._nc: nats.NATS | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._counts = dict.fromkeys(
            ("received", "inserted_rows", "batches", "rejected", "insert_failures",
             "consume_errors", "queries", "query_failures"), 0)

    async def start(self) -> None:
        """Opens and migrates the store, ensures stream and consumer, then consumes."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metering-store")
        try:
            self._store = await self._in_store_thread(self._open_store)
            self._nc = await connect_bus(self.cfg.nats, "switchyard-metering")
            js = self._nc.jetstream(timeout=self.cfg.nats.request_timeout_s)
            await self._ensure_stream(js)
            self._sub = await self._subscribe(js)
            await self._nc.subscribe(USAGE_QUERY_SUBJECT, queue=QUERY_QUEUE, cb=self._on_query)
            await BillingQueries(self._with_store, self._counts).subscribe(self._nc)
            await self._nc.flush(timeout=self.cfg.nats.request_timeout_s)
        except BaseException:
            await self.aclose()
            raise
        self._consumer = asyncio.create_task(self._consume_forever(), name="metering-consume")

    async def aclose(self) -> None:
        """Stops consuming, drains NATS (in-flight queries finish), closes the store."""
        if self._consumer is not None:
            self._consumer.cancel()
            # wait() leaves the task's CancelledError in the task, while a
            # cancellation of aclose itself still propagates.
            await asyncio.wait([self._consumer])
            self._consumer = None
        cancelled = await self._close_nats()
        try:
            if self._store is not None:
                store, self._store = self._store, None
                await self._in_store_thread(store.close)
        finally:
            if self._executor is not None:
                # Does not wait: the worker exits once its last job (close) ends.
                self._executor.shutdown(wait=False)
                self._executor = None
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
            # nats-py's fetch takes queued messages without marking them done,
            # so draining this subscription would wait out the drain timeout
            # (30 s). Its unacked messages come back after ack_wait.
            await sub.unsubscribe()
        task = asyncio.current_task()
        cancels_before = task.cancelling() if task is not None else 0
        await nc.drain()
        return task is not None and task.cancelling() > cancels_before

    def stats(self) -> dict[str, int]:
        """Counters since start; `rejected` counts events terminated as undecodable
        or out of column range, `received` counts deliveries (repeats included)."""
        return dict(self._counts)

    def _open_store(self) -> UsageStore:
        store = open_store(self.cfg.metering.clickhouse, self.cfg.var_dir)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    async def _in_store_thread(self, fn: Callable[..., T], *args: object) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _with_store(self, fn: Callable[..., T], *args: object) -> T:
        assert self._store is not None
        return await self._in_store_thread(fn, self._store, *args)

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        config = StreamConfig(name=self.cfg.nats.usage_stream, subjects=[USAGE_SUBJECTS],
                              duplicate_window=self.cfg.nats.duplicate_window_s,
                              storage=StorageType.FILE)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_EXISTS_ERR_CODE:
                raise
            await js.update_stream(config)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        m = self.cfg.metering
        config = ConsumerConfig(
            durable_name=CONSUMER_NAME, name=CONSUMER_NAME, filter_subject=USAGE_SUBJECTS,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=m.ack_wait_s, max_deliver=m.max_deliver,
            # The server default (1000) would cap every fetch below batch_max;
            # twice leaves room for a batch waiting on redelivery.
            max_ack_pending=2 * m.batch_max)
        # Creates the durable consumer, or updates it to the configured settings.
        await js.add_consumer(self.cfg.nats.usage_stream, config)
        return await js.pull_subscribe_bind(durable=CONSUMER_NAME,
                                            stream=self.cfg.nats.usage_stream)

    async def _consume_forever(self) -> None:
        while True:
            try:
                await self._consume_batch()
            except TimeoutError:
                continue  # nothing arrived within fetch_wait_s
            except Exception:
                self._counts["consume_errors"] += 1
                log.warning("usage consumer failed; retrying", exc_info=True)
                await asyncio.sleep(CONSUME_RETRY_S)

    async def _consume_batch(self) -> None:
        assert self._sub is not None and self._store is not None
        store = self._store
        m = self.cfg.metering
        msgs = await self._sub.fetch(batch=m.batch_max, timeout=m.fetch_wait_s)
        self._counts["received"] += len(msgs)
        events: dict[str, UsageEvent] = {}
        kept: list[Msg] = []
        for msg in msgs:
            event = self._decode(msg)
            if event is None:
                await msg.term()
                continue
            # A redelivered event can meet its first copy in one batch.
            events[event.request_id] = event
            kept.append(msg)
        if not kept:
            return
        batch = tuple(events.values())
        try:
            await self._in_store_thread(insert_batch, store, batch)
        except Exception:
            self._counts["insert_failures"] += 1
            log.warning("usage insert of %d events failed; will retry", len(batch), exc_info=True)
            for msg in kept:
                await msg.nak(delay=retry_delay_s(msg.metadata.num_delivered))
            return
        for msg in kept:
            await msg.ack()
        self._counts["batches"] += 1
        self._counts["inserted_rows"] += len(batch)

    def _decode(self, msg: Msg) -> UsageEvent | None:
        try:
            event = usage_decoder.decode(msg.data)
        except msgspec.DecodeError:
            event = None
        if event is None or not fits_columns(event):
            self._counts["rejected"] += 1
            log.warning("usage consumer: terminating an unusable event on %s", msg.subject)
            return None
        return event

    async def _on_query(self, msg: Msg) -> None:
        self._counts["queries"] += 1
        store = self._store
        assert store is not None
        try:
            query = usage_query_decoder.decode(msg.data)
            reply = UsageReply(totals=await self._in_store_thread(store.totals, query.tenant_id))
        except msgspec.DecodeError as exc:
            self._counts["query_failures"] += 1
            reply = UsageReply(error=f"bad usage query: {exc}")
        except Exception as exc:
            self._counts["query_failures"] += 1
            log.warning("usage query failed", exc_info=True)
            reply = UsageReply(error=f"usage query failed: {exc}")
        if msg.reply:
            await msg.respond(encode(reply))
