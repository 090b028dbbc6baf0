"""The metering consumer's own pull loop (analytics/usage_pull.py) against a
recording stand-in for the NATS client, the delivery count read from an ack
subject, and the store process (analytics/store_process.py) for real."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from analytics.store import UsageStore
from analytics.store_process import StoreProcess, StoreProcessDied
from analytics.usage_pull import BatchPuller, deliveries
from scheduler.config import ClickHouseConfig

STREAM, CONSUMER = "YARD_USAGE", "yard-metering"
NEXT = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"


class RecordingNats:
    """What BatchPuller uses of a nats-py client; keeps the pull requests."""

    def __init__(self) -> None:
        self.is_closed = False
        self.requests: list[tuple[str, dict[str, int]]] = []
        self.cb = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: object) -> RecordingNats:
        assert subject == "_INBOX.test.*"
        self.cb = cb
        return self

    async def unsubscribe(self) -> None:
        self.cb = None

    async def publish(self, subject: str, body: bytes, reply: str) -> None:
        assert subject == NEXT
        self.requests.append((reply, msgspec.json.decode(body)))


def data(seq: int, delivered: int = 1) -> Msg:
    return Msg(None, subject="yard.usage.acme",  # type: ignore[arg-type]
               reply=f"$JS.ACK.{STREAM}.{CONSUMER}.{delivered}.{seq}.{seq}.1700000000000000000.0",
               data=b"{}", headers={"Nats-Msg-Id": f"r{seq}"})


def status(reply: str, code: str, pending: int | None = None) -> Msg:
    headers = {"Status": code}
    if pending is not None:
        headers["Nats-Pending-Messages"] = str(pending)
    return Msg(None, subject=reply, reply="", data=b"", headers=headers)  # type: ignore[arg-type]


async def started(batch_max: int = 10, linger_s: float = 0.05) -> tuple[BatchPuller, RecordingNats]:
    nc = RecordingNats()
    puller = BatchPuller(nc, STREAM, CONSUMER, batch_max, expires_s=0.5,  # type: ignore[arg-type]
                         linger_s=linger_s)
    await puller.start()
    return puller, nc


async def deliver(nc: RecordingNats, *msgs: Msg) -> None:
    for msg in msgs:
        await nc.cb(msg)  # type: ignore[misc]


async def test_full_batch_is_handed_out_at_once_and_the_next_is_asked_for() -> None:
    puller, nc = await started(batch_max=10, linger_s=5.0)
    waiting = asyncio.create_task(puller.next_batch(wait_s=5.0))
    await asyncio.sleep(0)
    assert nc.requests == [("_INBOX.test.1", {"batch": 10, "expires": 500_000_000})]
    await deliver(nc, *(data(i) for i in range(1, 11)))
    batch = await asyncio.wait_for(waiting, 1.0)  # long before linger_s
    assert [deliveries(m) for m in batch] == [1] * 10 and len(batch) == 10
    # Asked for the next batch while this one is being stored.
    assert nc.requests[-1] == ("_INBOX.test.2", {"batch": 10, "expires": 500_000_000})
    await puller.aclose()


@pytest.mark.parametrize(("delivered", "ending", "expect_len", "next_batch"), [
    # A partial batch waits linger_s for more, then goes; the open request
    # still holds 7 of credit, so 3 more are asked for.
    (3, None, 3, 3),
    # The request ended (expired, 408) having delivered 3 of 10: 7 were
    # never coming, so the next request asks for a whole batch again.
    (3, ("408", 7), 3, 10),
    # A server without the pending header: with no request open, no credit.
    (3, ("408", None), 3, 10),
    # A heartbeat ends nothing.
    (3, ("100", None), 3, 3),
    # One short of a batch: a top-up below a quarter of one waits.
    (1, None, 1, None),
])
async def test_partial_batches(delivered: int, ending: tuple[str, int | None] | None,
                               expect_len: int, next_batch: int | None) -> None:
    puller, nc = await started(batch_max=10, linger_s=0.05)
    first = asyncio.create_task(puller.next_batch(wait_s=5.0))
    await asyncio.sleep(0)
    await deliver(nc, *(data(i) for i in range(1, delivered + 1)))
    if ending is not None:
        await deliver(nc, status("_INBOX.test.1", *ending))
    batch = await asyncio.wait_for(first, 1.0)
    assert len(batch) == expect_len
    asks = [body["batch"] for _, body in nc.requests[1:]]
    assert asks == ([] if next_batch is None else [next_batch])
    await puller.aclose()


async def test_nothing_arrives() -> None:
    puller, nc = await started()
    assert await puller.next_batch(wait_s=0.05) == []
    assert len(nc.requests) == 1
    await puller.aclose()


@pytest.mark.parametrize(("reply", "delivered"), [
    (f"$JS.ACK.{STREAM}.{CONSUMER}.1.7.7.1700000000000000000.0", 1),
    (f"$JS.ACK.{STREAM}.{CONSUMER}.4.7.9.1700000000000000000.12", 4),
    # The longer form: domain and account hash after ACK, a token at the end.
    (f"$JS.ACK._.ACCHASH.{STREAM}.{CONSUMER}.3.7.9.1700000000000000000.0.xyz", 3),
    (f"$JS.ACK.hub.ACCHASH.{STREAM}.{CONSUMER}.12.7.9.1700000000000000000.0.xyz", 12),
])
def test_deliveries_equals_nats_metadata(reply: str, delivered: int) -> None:
    msg = Msg(None, subject="s", reply=reply, data=b"")  # type: ignore[arg-type]
    assert deliveries(msg) == msg.metadata.num_delivered == delivered


def raw_rows(store: UsageStore) -> int:
    return store.raw_row_count()


def fail(store: UsageStore, message: str) -> None:
    raise ValueError(message)


def process_id(store: UsageStore) -> int:
    return os.getpid()


async def test_store_process_calls_errors_and_restart(tmp_path: Path) -> None:
    store = StoreProcess(ClickHouseConfig(path=str(tmp_path / "ch")), str(tmp_path))
    try:
        assert await store.call(UsageStore.migrate) == [1, 2]
        assert await store.call(raw_rows) == 0
        with pytest.raises(ValueError, match="refused"):
            await store.call(fail, "refused")
        first = await store.call(process_id)
        assert first != os.getpid()
        # A store process that dies fails the call under way; the next call
        # starts another, which finds the path unlocked.
        os.kill(first, signal.SIGKILL)
        with pytest.raises(StoreProcessDied):
            await store.call(raw_rows)
        assert await store.call(process_id) != first
        assert store.starts == 2
    finally:
        await store.aclose()


@pytest.mark.parametrize("yields", range(6))
async def test_a_cancellation_as_a_batch_arrives_is_never_lost(yields: int) -> None:
    """aclose cancels the consumer while it waits for a batch; a cancellation
    landing just as the batch arrives must still end it (asyncio.wait_for in
    Python 3.11 returned the batch instead, and the consumer pulled on)."""
    puller, nc = await started(batch_max=1, linger_s=0.0)
    waiting = asyncio.create_task(puller.next_batch(wait_s=5.0))
    await asyncio.sleep(0)
    await deliver(nc, data(1))
    for _ in range(yields):
        await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.wait([waiting])
    # Either it was done before the cancel (with its batch) or it was cancelled.
    assert waiting.cancelled() or (yields > 0 and len(waiting.result()) == 1)
    await puller.aclose()
