"""BatchPuller: batches from a JetStream durable pull consumer over a
connection of its own (analytics/pull_connection.py), without nats-py's
per-message work.

Pull requests (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`) ask for
just enough to keep the buffer plus the requests' remaining credit at one
batch, and what the server delivers to their inbox is buffered. A batch is
handed out when it is full, when its oldest event has waited `linger_s`, or
when every request has ended. The next batch is asked for as soon as one is
handed out, so it arrives while the last one is being stored.

A delivery is the wire's (subject, reply, header, payload) bytes; the reply
is its ack subject, which also carries its delivery count. Acks stay
explicit (one per message, all of a batch in one write), so several pullers
(metering services) may share the durable consumer."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from analytics.pull_connection import Frame, PullConnection, PullConnectionLost

# A status message's header starts "NATS/1.0 <code>": 404 no messages, 408
# expired, 409 e.g. consumer deleted or max_ack_pending reached end a pull
# request; 100 is an idle heartbeat, which ends nothing.
_STATUS_PREFIX = b"NATS/1.0 "
_HEARTBEAT_STATUS = b"100"
_EXPIRED_STATUS = b"408"
# On an ended request: how many of the messages it asked for it did not get.
_PENDING_HEADER = b"Nats-Pending-Messages:"
# A request the server never ended (the connection dropped meanwhile) is
# forgotten this long after its own expiry.
REQUEST_GRACE_S = 1.0
# `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`;
# the longer form puts a domain and an account hash after ACK.
_V1_ACK_TOKENS = 9
_V1_DELIVERED_TOKEN = 4
_V2_DELIVERED_TOKEN = 6
# Smaller top-ups are left for later: each request costs a server round trip.
MIN_REQUEST_FRACTION = 4
SETTLE_TIMEOUT_S = 5.0
ACK = b""
TERM = b"+TERM"

Connect = Callable[[Callable[[list[Frame]], None]], Awaitable[PullConnection]]


def deliveries(reply: bytes) -> int:
    """How often JetStream has delivered a message, from its ack subject."""
    tokens = reply.split(b".")
    if len(tokens) == _V1_ACK_TOKENS:
        return int(tokens[_V1_DELIVERED_TOKEN])
    return int(tokens[_V2_DELIVERED_TOKEN])


def nak_payload(delay_s: float) -> bytes:
    return b'-NAK {"delay": %d}' % int(delay_s * 1e9)


def status_of(header: bytes) -> tuple[bytes, int] | None:
    """(code, pending messages) of a status message's header; None for a
    data message's."""
    if not header.startswith(_STATUS_PREFIX):
        return None
    code = header[len(_STATUS_PREFIX):len(_STATUS_PREFIX) + 3]
    pending = 0
    at = header.find(_PENDING_HEADER)
    if at >= 0:
        pending = int(header[at + len(_PENDING_HEADER):header.find(b"\r\n", at)].strip())
    return code, pending


class _PullRequest(msgspec.Struct, omit_defaults=True):
    batch: int
    expires: int  # nanoseconds


_request_encoder = msgspec.json.Encoder()


class BatchPuller:
    """Pulls from `consumer` on `stream`; `start()` before `next_batch()`,
    `aclose()` after. `connect` opens a PullConnection delivering to the
    callback it gets; `expires_s` bounds how long one pull request waits on
    the server; `clock_s` is injectable for tests."""

    def __init__(self, connect: Connect, stream: str, consumer: str, batch_max: int,
                 expires_s: float, linger_s: float,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self._connect = connect
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch_max = batch_max
        self._expires_s = expires_s
        self._linger_s = linger_s
        self._clock_s = clock_s
        self._conn: PullConnection | None = None
        self._inbox = ""
        self._inbox_prefix = b""
        self._buffer: list[Frame] = []
        self._first_at_s = 0.0
        # Open pull requests: reply inbox -> when the server ends it.
        self._open: dict[bytes, float] = {}
        self._credit = 0
        # No request is open, and the last one ended by expiring.
        self._expired = False
        self._requests = 0
        self._changed = asyncio.Event()
        # The store task's acks and the pull loop may both find the
        # connection gone; one of them opens the next.
        self._connecting = asyncio.Lock()
        self._closed = False
        self.counts = {"pull_requests": 0, "pull_ends": 0, "pull_connects": 0}

    async def start(self) -> None:
        await self._connected()

    async def aclose(self) -> None:
        """Closes the connection; buffered messages are dropped unacked and
        come back after the consumer's ack_wait."""
        self._closed = True
        self._reset()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def next_batch(self, wait_s: float) -> list[Frame]:
        """Up to batch_max deliveries; [] when none arrived within `wait_s`.
        Raises PullConnectionLost when the connection dropped (the next
        call opens another)."""
        await self._top_up()
        deadline_s = self._clock_s() + wait_s
        while not self._buffer and self._clock_s() < deadline_s:
            await self._wait(deadline_s - self._clock_s(),
                             lambda: bool(self._buffer) or self._expired)
            if self._expired and not self._buffer:
                # Every request expired (408) unanswered: ask again at once,
                # not after wait_s (events published meanwhile would wait).
                await self._top_up()
        if not self._buffer:
            self._raise_if_lost()
            return []
        linger_left_s = self._first_at_s + self._linger_s - self._clock_s()
        if linger_left_s > 0:
            await self._wait(linger_left_s, self._batch_ready)
        batch = self._buffer[:self._batch_max]
        del self._buffer[:self._batch_max]
        if self._buffer:
            self._first_at_s = self._clock_s()
        await self._top_up()
        return batch

    async def settle(self, frames: Sequence[Frame], payload: bytes = ACK,
                     timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Acks (or with `payload` naks or terms) each of `frames` in one write,
        then waits until the server has read them: after that a crash does
        not bring them back."""
        conn = await self._connected()
        conn.publish_each([frame[1] for frame in frames], payload)
        await conn.flush(timeout_s)

    def _raise_if_lost(self) -> None:
        if self._conn is not None and not self._conn.is_open:
            self._conn = None
            self._reset()
            raise PullConnectionLost("the pull connection dropped; buffered deliveries return")

    async def _connected(self) -> PullConnection:
        if self._closed:
            raise PullConnectionLost("the puller was closed")
        self._raise_if_lost()
        if self._conn is not None:
            return self._conn
        async with self._connecting:
            return await self._open_connection()

    async def _open_connection(self) -> PullConnection:
        if self._conn is None:
            self._inbox = f"_INBOX.{secrets.token_hex(11)}"
            self._inbox_prefix = f"{self._inbox}.".encode()
            conn = await self._connect(self._on_frames)
            if self._closed:
                conn.close()
                raise PullConnectionLost("the puller was closed")
            conn.subscribe(f"{self._inbox}.*")
            self._conn = conn
            self.counts["pull_connects"] += 1
        return self._conn

    def _reset(self) -> None:
        self._buffer.clear()
        self._open.clear()
        self._expired = False
        self._credit = 0
        self._changed.set()

    def _batch_ready(self) -> bool:
        return len(self._buffer) >= self._batch_max or not self._credit

    async def _wait(self, timeout_s: float, done: Callable[[], bool]) -> None:
        """Until `done()`, the timeout, or the connection dropped. Not
        asyncio.wait_for: in Python 3.11 it drops a cancellation that arrives
        as the event is set, and the consumer then pulled on after aclose
        cancelled it. A timer setting the event cannot do that."""
        loop = asyncio.get_running_loop()
        deadline_s = self._clock_s() + timeout_s
        while not done() and self._conn is not None and self._conn.is_open:
            left_s = deadline_s - self._clock_s()
            if left_s <= 0:
                return
            self._changed.clear()
            timer = loop.call_later(left_s, self._changed.set)
            try:
                await self._changed.wait()
            finally:
                timer.cancel()

    async def _top_up(self) -> None:
        """Asks for what the buffer and the open requests' credit lack of a
        batch, unless that is a small part of one and some request is open."""
        conn = await self._connected()
        now_s = self._clock_s()
        for reply, ends_s in list(self._open.items()):
            if now_s > ends_s + REQUEST_GRACE_S:
                self._end(reply, 0)
        need = self._batch_max - len(self._buffer) - self._credit
        if need <= 0 or (self._open and need < self._batch_max // MIN_REQUEST_FRACTION):
            return
        self._requests += 1
        reply = self._inbox_prefix + b"%d" % self._requests
        self._open[reply] = now_s + self._expires_s
        self._expired = False
        self._credit += need
        body = _request_encoder.encode(
            _PullRequest(batch=need, expires=int(self._expires_s * 1e9)))
        conn.publish(self._next_subject, body, reply=reply.decode())
        self.counts["pull_requests"] += 1

    def _on_frames(self, frames: list[Frame]) -> None:
        """Called by the connection per socket read (and with [] when it
        drops). Delivered messages carry their own subject, not the request's
        inbox, so credit is counted in total; status messages name theirs."""
        prefix = self._inbox_prefix
        data = frames
        if any(frame[0].startswith(prefix) for frame in frames):
            data = []
            for frame in frames:
                if not frame[0].startswith(prefix):
                    data.append(frame)
                    continue
                status = status_of(frame[2])
                if status is not None and status[0] != _HEARTBEAT_STATUS:
                    self._end(frame[0], status[1], expired=status[0] == _EXPIRED_STATUS)
        if data:
            self._credit = max(0, self._credit - len(data))
            if not self._buffer:
                self._first_at_s = self._clock_s()
            self._buffer.extend(data)
        self._changed.set()

    def _end(self, reply: bytes, unused_credit: int, expired: bool = False) -> None:
        if self._open.pop(reply, None) is None:
            return
        self._expired = expired and not self._open
        self.counts["pull_ends"] += 1
        # With no request open nothing more is coming, whatever was counted.
        self._credit = max(0, self._credit - unused_credit) if self._open else 0
        self._changed.set()
