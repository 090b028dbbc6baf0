"""The metering consumer's own pull loop (analytics/usage_pull.py) against a
recording stand-in for its connection, the frame parser of that connection
(analytics/pull_connection.py), the delivery count read from an ack subject,
and the store process (analytics/store_process.py) for real."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from analytics.pull_connection import Frame, FrameParser, PullConnectionLost, connect_options
from analytics.store import UsageStore
from analytics.store_process import StoreProcess, StoreProcessDied
from analytics.usage_pull import BatchPuller, deliveries, nak_payload, status_of
from scheduler.config import ClickHouseConfig

STREAM, CONSUMER = "YARD_USAGE", "yard-metering"
NEXT = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"


class RecordingConnection:
    """What BatchPuller uses of a PullConnection; keeps what it writes."""

    def __init__(self, on_frames: Callable[[list[Frame]], None]) -> None:
        self.on_frames = on_frames
        self.is_open = True
        self.subjects: list[str] = []
        self.requests: list[tuple[str, dict[str, int]]] = []
        self.settled: list[tuple[list[bytes], bytes]] = []

    def subscribe(self, subject: str) -> None:
        self.subjects.append(subject)

    def publish(self, subject: str, body: bytes, reply: str) -> None:
        assert subject == NEXT
        self.requests.append((reply.removeprefix(self.subjects[-1][:-1]),
                              msgspec.json.decode(body)))

    def publish_each(self, subjects: list[bytes], payload: bytes) -> None:
        self.settled.append((subjects, payload))

    async def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        self.is_open = False


def data(seq: int, delivered: int = 1) -> Frame:
    return (b"yard.usage.acme",
            f"$JS.ACK.{STREAM}.{CONSUMER}.{delivered}.{seq}.{seq}.1700000000000000000.0".encode(),
            f"NATS/1.0\r\nNats-Msg-Id: r{seq}\r\n\r\n".encode(), b"{}")


def status(nc: RecordingConnection, request: str, code: str, pending: int | None = None) -> Frame:
    header = f"NATS/1.0 {code} Request Timeout\r\n"
    if pending is not None:
        header += f"Nats-Pending-Messages: {pending}\r\nNats-Pending-Bytes: 0\r\n"
    inbox = nc.subjects[-1][:-1].encode()
    return inbox + request.encode(), b"", (header + "\r\n").encode(), b""


async def started(batch_max: int = 10,
                  linger_s: float = 0.05) -> tuple[BatchPuller, RecordingConnection]:
    conns: list[RecordingConnection] = []

    async def connect(on_frames: Callable[[list[Frame]], None]) -> RecordingConnection:
        conns.append(RecordingConnection(on_frames))
        return conns[-1]

    puller = BatchPuller(connect, STREAM, CONSUMER, batch_max, expires_s=0.5,  # type: ignore[arg-type]
                         linger_s=linger_s)
    await puller.start()
    return puller, conns[0]


async def deliver(nc: RecordingConnection, *frames: Frame) -> None:
    nc.on_frames(list(frames))


async def test_full_batch_is_handed_out_at_once_and_the_next_is_asked_for() -> None:
    puller, nc = await started(batch_max=10, linger_s=5.0)
    waiting = asyncio.create_task(puller.next_batch(wait_s=5.0))
    await asyncio.sleep(0)
    assert nc.requests == [("1", {"batch": 10, "expires": 500_000_000})]
    await deliver(nc, *(data(i) for i in range(1, 11)))
    batch = await asyncio.wait_for(waiting, 1.0)  # long before linger_s
    assert [deliveries(f[1]) for f in batch] == [1] * 10 and len(batch) == 10
    # Asked for the next batch while this one is being stored.
    assert nc.requests[-1] == ("2", {"batch": 10, "expires": 500_000_000})
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
        await deliver(nc, status(nc, "1", *ending))
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
    assert deliveries(reply.encode()) == msg.metadata.num_delivered == delivered


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


ACK_SUBJECT = b"$JS.ACK.YARD_USAGE.yard-metering.2.7.7.1700000000000000000.0"
DATA_HEADER = b"NATS/1.0\r\nNats-Msg-Id: r7\r\n\r\n"
STATUS_HEADER = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\n\r\n"
STREAM_BYTES = (
    b"INFO {\"max_payload\":1048576}\r\n"
    b"HMSG yard.usage.acme 1 %s %d %d\r\n%s{\"a\":1}\r\n"
    % (ACK_SUBJECT, len(DATA_HEADER), len(DATA_HEADER) + 7, DATA_HEADER)
    + b"PING\r\n"
    b"MSG yard.usage.acme 1 " + ACK_SUBJECT + b" 2\r\n{}\r\n"
    b"MSG _INBOX.x.1 1 3\r\nabc\r\n"
    + b"HMSG _INBOX.x.2 1 %d %d\r\n%s\r\n" % (len(STATUS_HEADER), len(STATUS_HEADER), STATUS_HEADER)
    + b"+OK\r\nPONG\r\n"
)
EXPECTED_FRAMES = [
    (b"yard.usage.acme", ACK_SUBJECT, DATA_HEADER, b"{\"a\":1}"),
    (b"yard.usage.acme", ACK_SUBJECT, b"", b"{}"),
    (b"_INBOX.x.1", b"", b"", b"abc"),
    (b"_INBOX.x.2", b"", STATUS_HEADER, b""),
]


@pytest.mark.parametrize("chunk", [len(STREAM_BYTES), 1, 2, 7, 50])
def test_frames_are_the_same_however_the_socket_splits_them(chunk: int) -> None:
    parser = FrameParser()
    frames: list[Frame] = []
    for at in range(0, len(STREAM_BYTES), chunk):
        frames += parser.feed(STREAM_BYTES[at:at + chunk])
    assert frames == EXPECTED_FRAMES
    assert (parser.pings, parser.pongs) == (1, 1)
    assert parser.info == b"{\"max_payload\":1048576}"


def test_a_server_error_fails_the_connection() -> None:
    with pytest.raises(PullConnectionLost, match="Permissions Violation"):
        FrameParser().feed(b"-ERR 'Permissions Violation for Subscription'\r\n")


@pytest.mark.parametrize(("header", "status"), [
    (EXPECTED_FRAMES[0][2], None),
    (EXPECTED_FRAMES[3][2], (b"408", 5)),
    (b"NATS/1.0 404 No Messages\r\n\r\n", (b"404", 0)),
    (b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", (b"100", 0)),
])
def test_status_of_a_header(header: bytes, status: tuple[bytes, int] | None) -> None:
    assert status_of(header) == status


@pytest.mark.parametrize(("url", "fields"), [
    ("nats://127.0.0.1:4222", {}),
    ("nats://alice:s%40cret@127.0.0.1:4222", {"user": "alice", "pass": "s@cret"}),
    ("nats://tok3n@127.0.0.1:4222", {"auth_token": "tok3n"}),
])
def test_connect_options_carry_the_urls_credentials(url: str, fields: dict[str, str]) -> None:
    options = msgspec.json.decode(msgspec.json.encode(connect_options(url, "n")))
    assert {k: v for k in ("user", "pass", "auth_token") if (v := options[k]) is not None} == fields
    assert options["headers"] is True and options["verbose"] is False


async def test_settle_writes_every_ack_subject_then_waits_for_the_server() -> None:
    puller, nc = await started()
    await puller.settle([data(1), data(2, delivered=3)])
    await puller.settle([data(3)], nak_payload(1.5))
    assert nc.settled == [([data(1)[1], data(2, 3)[1]], b""),
                          ([data(3)[1]], b'-NAK {"delay": 1500000000}')]
    await puller.aclose()


async def test_an_expired_request_is_renewed_at_once_while_waiting() -> None:
    """A request that expires (408) with nothing delivered is asked again at
    once, not when next_batch's wait ends, so events published meanwhile do
    not wait for it. An end that is not an expiry (409) is not repeated."""
    puller, nc = await started(batch_max=10, linger_s=0.0)
    waiting = asyncio.create_task(puller.next_batch(wait_s=5.0))
    await asyncio.sleep(0)
    await deliver(nc, status(nc, "1", "408", 10))
    await asyncio.sleep(0)
    assert [reply for reply, _ in nc.requests] == ["1", "2"]
    await deliver(nc, status(nc, "2", "409", 10))
    await asyncio.sleep(0.05)
    assert [reply for reply, _ in nc.requests] == ["1", "2"]
    await deliver(nc, data(1))
    assert len(await asyncio.wait_for(waiting, 1.0)) == 1
    await puller.aclose()
