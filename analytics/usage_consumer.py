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

from analytics.pricing import PriceReader, batch_costs
from analytics.pull_connection import Frame
from analytics.rollup_repair import repair_rollups
from analytics.store import (
    REQUEST_ID_COLUMN,
    TENANT_ID_COLUMN,
    Columns,
    UsageStore,
    column_rows,
    fits_columns,
    usage_columns,
)
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
# A batch's per-event work (decode, price) lets other tasks run this often:
# none of it suspends by itself, and a batch of 50,000 would hold the loop
# for a tenth of a second.
YIELD_EVERY = 5_000

COUNTERS = ("received", "inserted_rows", "batches", "already_stored", "dead_letters",
            "unpriced", "insert_failures", "store_unavailable", "price_read_failures",
            "consume_errors", "loop_stall_max_ms")

_events_decoder = msgspec.json.Decoder(list[UsageEvent])


def dedup_token(request_ids: Sequence[str]) -> str:
    """Same request ids, same token: a repeated insert of a batch adds nothing."""
    return hashlib.sha256("".join([i + "\0" for i in sorted(request_ids)]).encode()).hexdigest()


def retry_delay_s(deliveries: int) -> float:
    return min(NAK_MAX_DELAY_S, NAK_FIRST_DELAY_S * 2 ** max(0, deliveries - 1))


@dataclass(slots=True)
class _Batch:
    """A prepared batch: the deliveries of its events (one per request id,
    row order), repeated deliveries of those, the model of each unpriced
    event by row, and the batch as the store process takes it."""
    frames: list[Frame]
    repeats: list[Frame]
    unpriced: dict[int, str]
    payload: bytes


class StoreBatch(msgspec.Struct, array_like=True, frozen=True):
    """What the store process needs of a batch (the deliveries do not travel):
    usage_columns' columns, and the rows delivered before, which are looked up
    before the insert. Columns, not events: one list per column decodes into
    far fewer objects than a struct per event, and goes to the insert as is."""
    columns: Columns
    redelivered_rows: list[int]


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(StoreBatch)


def encode_batch(events: Sequence[UsageEvent], costs_nusd: Sequence[int],
                 redelivered_rows: list[int]) -> bytes:
    """msgpack: ten times cheaper than pickling on the loop."""
    return _batch_encoder.encode(StoreBatch(usage_columns(events, costs_nusd), redelivered_rows))


def store_batch(store: UsageStore, payload: bytes) -> tuple[int, int]:
    """Runs where the store lives. Inserts the events usage_raw does not hold
    yet; returns (inserted, already stored). Only redeliveries are looked up:
    a first delivery cannot have been stored by this consumer."""
    batch = _batch_decoder.decode(payload)
    return _store(store, batch.columns, batch.redelivered_rows)


def _store(store: UsageStore, columns: Columns, suspect_rows: Sequence[int]) -> tuple[int, int]:
    """Inserts `columns` less the rows among `suspect_rows` already stored,
    and rechecks the rollups of those (analytics/rollup_repair.py)."""
    ids = columns[REQUEST_ID_COLUMN]
    tenants = columns[TENANT_ID_COLUMN]
    stored: set[str] = set()
    if suspect_rows:
        stored = store.stored_request_ids([tenants[i] for i in suspect_rows],
                                          [ids[i] for i in suspect_rows])
    fresh = columns
    if stored:
        fresh = column_rows(columns, [i for i, rid in enumerate(ids) if rid not in stored])
    fresh_ids = fresh[REQUEST_ID_COLUMN]
    store.insert(fresh, dedup_token(fresh_ids))
    if stored:
        stored_rows = [i for i in suspect_rows if ids[i] in stored]
        repair_rollups(store, [tenants[i] for i in stored_rows], [ids[i] for i in stored_rows])
    return len(fresh_ids), len(ids) - len(fresh_ids)


def isolate_failures(store: UsageStore, payload: bytes) -> dict[int, str]:
    """Runs where the store lives, after a batch failed on a store that
    answers: inserts halves until each event that fails does so alone.
    Returns row -> error of those; the others are stored. Every row is looked
    up first: the failed insert may have committed before it raised (an
    ambiguous failure), and a half inserted under its own token would store
    those rows again, raw rows and rollups alike."""
    columns = _batch_decoder.decode(payload).columns
    failed: dict[int, str] = {}

    def attempt(lo: int, hi: int) -> None:
        try:
            _store(store, [column[lo:hi] for column in columns], range(hi - lo))
        except Exception as exc:  # noqa: BLE001 - narrowed down, then reported per event
            if hi - lo == 1:
                failed[lo] = f"{type(exc).__name__}: {exc}"[:500]
                return
            mid = (lo + hi) // 2
            attempt(lo, mid)
            attempt(mid, hi)

    attempt(0, len(columns[REQUEST_ID_COLUMN]))
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
                    storing = asyncio.create_task(self._store_batch(ready),
                                                  name="metering-store-batch")
        finally:
            if storing is not None:
                storing.cancel()
                await asyncio.wait([storing])

    async def _prepare_batch(self) -> tuple[_Batch | None, float]:
        """Fetches, decodes and prices one batch; None when there is nothing
        to store (nothing came, or all was dead-lettered or nak'd here), and
        how long to pause (Redis is away)."""
        frames = await self._puller.next_batch(self.cfg.fetch_wait_s)
        if not frames:
            return None, 0.0
        self.counts["received"] += len(frames)
        decoded = await self._decoded(frames)
        events: list[UsageEvent] = [e for e in decoded if e is not None]
        repeats: list[Frame] = []
        if len(events) < len(frames) or len({e.request_id for e in events}) < len(events):
            frames, events, repeats = _first_of_each(frames, decoded)
        if not events:
            return None, 0.0
        try:
            prices = await self._prices.for_events(events)
        except Exception:
            self.counts["price_read_failures"] += 1
            log.warning("usage consumer: prices unreadable; will retry", exc_info=True)
            return None, await self._nak_all(frames + repeats)
        costs: list[int] = []
        unpriced: dict[int, str] = {}
        for at in range(0, len(events), YIELD_EVERY):
            if at:
                await asyncio.sleep(0)
            chunk_costs, chunk_unpriced = batch_costs(events[at:at + YIELD_EVERY], prices)
            costs += chunk_costs
            unpriced.update((at + i, events[at + i].model) for i in chunk_unpriced)
        redelivered_rows = [i for i, frame in enumerate(frames) if deliveries(frame[1]) > 1]
        return _Batch(frames, repeats, unpriced,
                      encode_batch(events, costs, redelivered_rows)), 0.0

    async def _decoded(self, frames: list[Frame]) -> list[UsageEvent | None]:
        """Each delivery's event; None for one dead-lettered here. Decoding is
        deterministic: an event that cannot be decoded or could never fit the
        columns is dead-lettered at once, not redelivered. A chunk is decoded
        as one JSON array (one call, not one per event); only a chunk that
        fails is decoded event by event, to find the culprits."""
        events: list[UsageEvent | None] = []
        for at in range(0, len(frames), YIELD_EVERY):
            if at:
                await asyncio.sleep(0)
            chunk = frames[at:at + YIELD_EVERY]
            try:
                events += _events_decoder.decode(
                    b"[" + b",".join([frame[3] for frame in chunk]) + b"]")
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

    async def _store_batch(self, batch: _Batch) -> float:
        """Inserts, then acks; returns how long to pause before the next batch
        (the store is away: its events wait in the stream, not in a loop here)."""
        try:
            # Looked up here, not bound at import: tests wrap it.
            inserted, already = await self._store(store_batch, batch.payload)
        except Exception:
            self.counts["insert_failures"] += 1
            log.warning("usage insert of %d events failed", len(batch.frames), exc_info=True)
            return await self._after_failed_insert(batch)
        await self._settle(batch.frames + batch.repeats, list(batch.unpriced.values()),
                           inserted, already)
        return 0.0

    async def _settle(self, frames: list[Frame], unpriced_models: Sequence[str],
                      inserted: int, already: int) -> None:
        # One write; once the server has read it, a crash does not bring the batch back.
        await self._puller.settle(frames)
        if unpriced_models:
            self.counts["unpriced"] += len(unpriced_models)
            log.warning("usage consumer: %d events of unpriced models %s stored at cost 0",
                        len(unpriced_models), sorted(set(unpriced_models)))
        if already:
            log.info("usage consumer: %d redelivered events were stored already (ack lost)",
                     already)
        self.counts["batches"] += 1
        self.counts["inserted_rows"] += inserted
        self.counts["already_stored"] += already

    async def _after_failed_insert(self, batch: _Batch) -> float:
        """A store that does not answer gets the batch again later. One that
        answers has refused some event: find which, store the others, and
        dead-letter a refused event on its last allowed delivery."""
        if not await self._store_answers():
            return await self._nak_all(batch.frames + batch.repeats)
        failed = await self._store(isolate_failures, batch.payload)
        # Everything failing alone may be the store going away meanwhile.
        if len(failed) == len(batch.frames) and not await self._store_answers():
            return await self._nak_all(batch.frames + batch.repeats)
        stored = [frame for i, frame in enumerate(batch.frames) if i not in failed]
        unpriced = [model for i, model in batch.unpriced.items() if i not in failed]
        await self._settle(stored + batch.repeats, unpriced, len(stored), 0)
        for i, reason in failed.items():
            frame = batch.frames[i]
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

    async def _nak_all(self, frames: list[Frame]) -> float:
        """Naks each delivery with its own delay (one write per delay);
        returns the longest."""
        by_delay: dict[float, list[Frame]] = {}
        for frame in frames:
            by_delay.setdefault(retry_delay_s(deliveries(frame[1])), []).append(frame)
        for delay_s, same_delay in by_delay.items():
            await self._puller.settle(same_delay, nak_payload(delay_s))
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


def _first_of_each(frames: list[Frame], events: list[UsageEvent | None]
                   ) -> tuple[list[Frame], list[UsageEvent], list[Frame]]:
    """The deliveries and events to store (the first of each request id;
    none dead-lettered) and the repeated deliveries: a redelivered event can
    meet its first copy in one batch."""
    kept_frames: list[Frame] = []
    kept_events: list[UsageEvent] = []
    repeats: list[Frame] = []
    seen: set[str] = set()
    for frame, event in zip(frames, events, strict=True):
        if event is None:
            continue
        if event.request_id in seen:
            repeats.append(frame)
        else:
            seen.add(event.request_id)
            kept_frames.append(frame)
            kept_events.append(event)
    return kept_frames, kept_events, repeats
