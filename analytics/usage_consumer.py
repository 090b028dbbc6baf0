"""UsageConsumer: the JetStream usage stream into ClickHouse, each request id
once. Per batch: decode, dead-letter what can never be stored, price, drop
what a lost ack left stored already, insert, then ack; the next batch is
prepared while one is inserted.

Exactly once comes from three layers: JetStream drops a repeated publish
(Nats-Msg-Id = request id) inside its duplicate window; a redelivered event
whose request id usage_raw already holds is acked without an insert; and
what still slips through (a repeat published after the window) is one more
usage_raw row that ReplacingMergeTree and FINAL collapse."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from analytics.pricing import PriceReader, event_cost_nusd
from analytics.pull_connection import Frame
from analytics.store import UsageStore, fits_columns
from analytics.usage_pull import TERM, BatchPuller, deliveries, nak_payload
from scheduler.config import MeteringConfig
from scheduler.wire import (
    USAGE_DEAD_LETTER_SUBJECT,
    UsageDeadLetter,
    UsageEvent,
    encode,
    usage_decoder,
)

log = logging.getLogger("switchyard.metering")

# A failed insert is retried after this, doubling per delivery up to the cap.
NAK_FIRST_DELAY_S = 0.5
NAK_MAX_DELAY_S = 60.0
# Pause after a consumer error (NATS away, say) so the loop does not spin.
CONSUME_RETRY_S = 1.0

# Runs fn(store, *args) where the store lives (StoreProcess.call).
StoreCall = Callable[..., Awaitable[Any]]

# How often the loop's responsiveness is sampled (a sleep's overshoot).
LOOP_PROBE_S = 0.05
# A batch's per-message work (decode, price, ack) lets other tasks run this often:
# none of it suspends by itself, and a batch of 20,000 would hold the loop
# for most of a second.
YIELD_EVERY = 1_000

COUNTERS = ("received", "inserted_rows", "batches", "already_stored", "dead_letters",
            "unpriced", "insert_failures", "store_unavailable", "price_read_failures",
            "consume_errors", "loop_stall_max_ms")


def dedup_token(events: Sequence[UsageEvent]) -> str:
    """Same request ids, same token: a repeated insert of a batch adds nothing."""
    digest = hashlib.sha256()
    for request_id in sorted(e.request_id for e in events):
        digest.update(request_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def retry_delay_s(deliveries: int) -> float:
    return min(NAK_MAX_DELAY_S, NAK_FIRST_DELAY_S * 2 ** max(0, deliveries - 1))


@dataclass(slots=True)
class _Pending:
    frame: Frame
    event: UsageEvent
    cost_nusd: int | None = None


# A prepared batch: its events, repeated deliveries to ack, the encoded batch.
_Ready = tuple[list[_Pending], list[Frame], bytes]


class StoreBatch(msgspec.Struct, frozen=True):
    """What the store process needs of a batch (the deliveries do not travel)."""
    events: list[UsageEvent]
    costs_nusd: list[int]
    redelivered: list[bool]


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(StoreBatch)


def encode_batch(pending: Sequence[_Pending]) -> bytes:
    """msgpack: ten times cheaper than pickling the events on the loop."""
    return _batch_encoder.encode(StoreBatch(
        events=[p.event for p in pending], costs_nusd=[p.cost_nusd or 0 for p in pending],
        redelivered=[deliveries(p.frame[1]) > 1 for p in pending]))


def store_batch(store: UsageStore, payload: bytes) -> tuple[int, int]:
    """Runs where the store lives. Inserts the events usage_raw does not hold
    yet; returns (inserted, already stored). Only redeliveries are looked up:
    a first delivery cannot have been stored by this consumer."""
    return _store(store, _batch_decoder.decode(payload), 0, None)


def _store(store: UsageStore, batch: StoreBatch, lo: int, hi: int | None) -> tuple[int, int]:
    events, costs = batch.events[lo:hi], batch.costs_nusd[lo:hi]
    redelivered = [e for e, again in zip(events, batch.redelivered[lo:hi], strict=True) if again]
    stored = store.stored_request_ids(redelivered) if redelivered else set()
    fresh = [i for i, e in enumerate(events) if e.request_id not in stored]
    fresh_events = [events[i] for i in fresh]
    store.insert(fresh_events, [costs[i] for i in fresh], dedup_token(fresh_events))
    return len(fresh), len(events) - len(fresh)


def isolate_failures(store: UsageStore, payload: bytes) -> dict[int, str]:
    """Runs where the store lives, after a batch failed on a store that
    answers: inserts halves until each event that fails does so alone.
    Returns index -> error of those; the others are stored (ones already
    stored are skipped)."""
    batch = _batch_decoder.decode(payload)
    failed: dict[int, str] = {}

    def attempt(lo: int, hi: int) -> None:
        try:
            _store(store, batch, lo, hi)
        except Exception as exc:  # noqa: BLE001 - narrowed down, then reported per event
            if hi - lo == 1:
                failed[lo] = f"{type(exc).__name__}: {exc}"[:500]
                return
            mid = (lo + hi) // 2
            attempt(lo, mid)
            attempt(mid, hi)

    attempt(0, len(batch.events))
    return failed


def ping(store: UsageStore) -> None:
    store.ping()


class UsageConsumer:
    """Consumes until cancelled. `store` runs fn(store, *args) where the store
    lives."""

    def __init__(self, cfg: MeteringConfig, js: JetStreamContext,
                 puller: BatchPuller, store: StoreCall, prices: PriceReader) -> None:
        self.cfg = cfg
        self._js = js
        self._puller = puller
        self._store = store
        self._prices = prices
        self.counts = dict.fromkeys(COUNTERS, 0)

    async def run_forever(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_loop(), name="metering-loop-watch")
            await self._consume_forever()

    async def _watch_loop(self) -> None:
        """Keeps the worst lateness of a short sleep: a batch's work must not
        stall the loop (NATS pings, acks, usage queries)."""
        loop = asyncio.get_running_loop()
        while True:
            due_s = loop.time() + LOOP_PROBE_S
            await asyncio.sleep(LOOP_PROBE_S)
            stall_ms = round((loop.time() - due_s) * 1000)
            self.counts["loop_stall_max_ms"] = max(self.counts["loop_stall_max_ms"], stall_ms)

    async def _consume_forever(self) -> None:
        """One batch is stored (in the store process) while the next is
        fetched and prepared here; at most one insert is in flight, so a
        redelivery's lookup always follows the insert it looks for."""
        storing: asyncio.Task[float] | None = None
        try:
            while True:
                pause_s = 0.0
                try:
                    ready, pause_s = await self._prepare_batch()
                except Exception:
                    log.warning("usage consumer failed to fetch; retrying", exc_info=True)
                    self.counts["consume_errors"] += 1
                    pause_s, ready = CONSUME_RETRY_S, None
                if storing is not None:
                    try:
                        pause_s = max(pause_s, await storing)
                    except Exception:
                        log.warning("usage consumer failed to store; retrying", exc_info=True)
                        self.counts["consume_errors"] += 1
                        pause_s = CONSUME_RETRY_S
                    storing = None
                if pause_s:
                    await asyncio.sleep(pause_s)
                if ready is not None:
                    storing = asyncio.create_task(self._store_batch(*ready),
                                                  name="metering-store-batch")
        finally:
            if storing is not None:
                storing.cancel()
                await asyncio.wait([storing])

    async def _prepare_batch(self) -> tuple[_Ready | None, float]:
        """Fetches, decodes and prices one batch; None when there is nothing
        to store (nothing came, or all was dead-lettered or nak'd here), and
        how long to pause (Redis is away)."""
        frames = await self._puller.next_batch(self.cfg.fetch_wait_s)
        if not frames:
            return None, 0.0
        self.counts["received"] += len(frames)
        batch: dict[str, _Pending] = {}
        repeats: list[Frame] = []
        for frame, event in zip(frames, await self._decoded(frames), strict=True):
            if event is None:
                continue
            # A redelivered event can meet its first copy in one batch.
            if event.request_id in batch:
                repeats.append(frame)
            else:
                batch[event.request_id] = _Pending(frame, event)
        if not batch:
            return None, 0.0
        pending = list(batch.values())
        try:
            prices = await self._prices.for_events([p.event for p in pending])
        except Exception:
            self.counts["price_read_failures"] += 1
            log.warning("usage consumer: prices unreadable; will retry", exc_info=True)
            return None, await self._nak_all(pending, repeats)
        for n, p in enumerate(pending, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            p.cost_nusd = event_cost_nusd(p.event, prices)
        return (pending, repeats, encode_batch(pending)), 0.0

    async def _decoded(self, frames: list[Frame]) -> list[UsageEvent | None]:
        """Each delivery's event; None for one dead-lettered here. Decoding is
        deterministic: an event that cannot be decoded or could never fit the
        columns is dead-lettered at once, not redelivered."""
        events: list[UsageEvent | None] = []
        for at in range(0, len(frames), YIELD_EVERY):
            if at:
                await asyncio.sleep(0)
            chunk = frames[at:at + YIELD_EVERY]
            try:
                events += [usage_decoder.decode(frame[3]) for frame in chunk]
            except msgspec.DecodeError:
                events += [await self._decoded_one(frame) for frame in chunk]
        for i, event in enumerate(events):
            if event is not None and not fits_columns(event):
                await self._dead_letter(frames[i], "a count or the priority is out of range")
                events[i] = None
        return events

    async def _decoded_one(self, frame: Frame) -> UsageEvent | None:
        try:
            return usage_decoder.decode(frame[3])
        except msgspec.DecodeError as exc:
            await self._dead_letter(frame, f"undecodable: {exc}")
            return None

    async def _store_batch(self, pending: list[_Pending], repeats: list[Frame],
                           payload: bytes) -> float:
        """Inserts, then acks; returns how long to pause before the next batch
        (the store is away: its events wait in the stream, not in a loop here)."""
        try:
            # Looked up here, not bound at import: tests wrap it.
            inserted, already = await self._store(store_batch, payload)
        except Exception:
            self.counts["insert_failures"] += 1
            log.warning("usage insert of %d events failed", len(pending), exc_info=True)
            return await self._after_failed_insert(pending, repeats, payload)
        await self._settle(pending, repeats, inserted, already)
        return 0.0

    async def _settle(self, stored: Sequence[_Pending], repeats: Sequence[Frame],
                      inserted: int, already: int) -> None:
        # One write; once the server has read it, a crash does not bring the batch back.
        await self._puller.settle([p.frame for p in stored] + list(repeats))
        unpriced = [p.event for p in stored if p.cost_nusd is None]
        if unpriced:
            self.counts["unpriced"] += len(unpriced)
            log.warning("usage consumer: %d events of unpriced models %s stored at cost 0",
                        len(unpriced), sorted({e.model for e in unpriced}))
        if already:
            log.info("usage consumer: %d redelivered events were stored already (ack lost)",
                     already)
        self.counts["batches"] += 1
        self.counts["inserted_rows"] += inserted
        self.counts["already_stored"] += already

    async def _after_failed_insert(self, pending: list[_Pending], repeats: list[Frame],
                                   payload: bytes) -> float:
        """A store that does not answer gets the batch again later. One that
        answers has refused some event: find which, store the others, and
        dead-letter a refused event on its last allowed delivery."""
        if not await self._store_answers():
            return await self._nak_all(pending, repeats)
        failed = await self._store(isolate_failures, payload)
        # Everything failing alone may be the store going away meanwhile.
        if len(failed) == len(pending) and not await self._store_answers():
            return await self._nak_all(pending, repeats)
        stored = [p for i, p in enumerate(pending) if i not in failed]
        await self._settle(stored, repeats, len(stored), 0)
        for i, reason in failed.items():
            frame = pending[i].frame
            delivered = deliveries(frame[1])
            if delivered >= self.cfg.max_deliver:
                await self._dead_letter(frame, f"insert failed: {reason}")
            else:
                await self._puller.settle([frame], nak_payload(retry_delay_s(delivered)))
        return 0.0

    async def _store_answers(self) -> bool:
        try:
            await self._store(ping)
        except Exception:  # noqa: BLE001 - any failure to answer means "away"
            self.counts["store_unavailable"] += 1
            return False
        return True

    async def _nak_all(self, pending: Sequence[_Pending], repeats: Sequence[Frame]) -> float:
        """Naks each delivery with its own delay (one write per delay);
        returns the longest."""
        by_delay: dict[float, list[Frame]] = {}
        for frame in [p.frame for p in pending] + list(repeats):
            by_delay.setdefault(retry_delay_s(deliveries(frame[1])), []).append(frame)
        for delay_s, frames in by_delay.items():
            await self._puller.settle(frames, nak_payload(delay_s))
        return max(by_delay)

    async def _dead_letter(self, frame: Frame, reason: str) -> None:
        """Publishes the delivery with the reason to the dead-letter stream,
        then terminates it. Its Nats-Msg-Id is the usage stream's sequence, so
        a dead letter published twice (a crash before the term) is kept once."""
        subject, reply, _, data = frame
        # nats-py's parser of the ack subject; rare enough for its cost.
        meta = Msg(None, subject=subject.decode(), reply=reply.decode()).metadata  # type: ignore[arg-type]
        letter = UsageDeadLetter(reason=reason, subject=subject.decode(),
                                 stream_seq=meta.sequence.stream,
                                 deliveries=meta.num_delivered, payload=data)
        await self._js.publish(USAGE_DEAD_LETTER_SUBJECT, encode(letter),
                               headers={"Nats-Msg-Id": f"{meta.stream}:{meta.sequence.stream}"})
        await self._puller.settle([frame], TERM)
        self.counts["dead_letters"] += 1
        log.warning("usage consumer: dead-lettered stream seq %d (%s)",
                    meta.sequence.stream, reason)
