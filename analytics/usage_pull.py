"""BatchPuller: batches from a JetStream durable pull consumer, without
nats-py's `fetch`, which awaits every message separately (a `wait_for` each:
at tens of thousands of events a second that was most of the consumer's time).

One inbox subscription collects what the server delivers into a buffer; pull
requests (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`) ask for just
enough to keep the buffer plus the requests' remaining credit at one batch.
A batch is handed out when it is full, when its oldest event has waited
`linger_s`, or when every request has ended. The next batch is asked for as
soon as one is handed out, so it arrives while the last one is being stored.

Several pullers (metering services) may share the durable consumer: each
pulls its own messages, and acks stay explicit, one per message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

# JetStream status headers ending a pull request: 404 no messages, 408
# expired, 409 e.g. consumer deleted or max_ack_pending reached. 100 is an
# idle heartbeat, which ends nothing.
_STATUS_HEADER = "Status"
_HEARTBEAT_STATUS = "100"
# On an ended request: how many of the messages it asked for it did not get.
_PENDING_HEADER = "Nats-Pending-Messages"
# A request the server never ended (the connection dropped meanwhile) is
# forgotten this long after its own expiry.
REQUEST_GRACE_S = 1.0
# `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`;
# the longer form puts a domain and an account hash after ACK.
_V1_ACK_TOKENS = 9
_V1_DELIVERED_TOKEN = 4
# Smaller top-ups are left for later: each request costs a server round trip.
MIN_REQUEST_FRACTION = 4


def deliveries(msg: Msg) -> int:
    """How often JetStream has delivered `msg`, read from its ack subject
    alone: nats-py's `metadata` also parses a timestamp and builds objects,
    several times dearer, and this is asked of every message."""
    tokens = msg.reply.split(".")
    if len(tokens) == _V1_ACK_TOKENS:
        return int(tokens[_V1_DELIVERED_TOKEN])
    return int(tokens[Msg.Ack.NumDelivered])


class _PullRequest(msgspec.Struct, omit_defaults=True):
    batch: int
    expires: int  # nanoseconds


_request_encoder = msgspec.json.Encoder()


class BatchPuller:
    """Pulls from `consumer` on `stream`; `start()` before `next_batch()`,
    `aclose()` after. `expires_s` bounds how long one pull request waits on
    the server; `clock_s` is injectable for tests."""

    def __init__(self, nc: NATS, stream: str, consumer: str, batch_max: int,
                 expires_s: float, linger_s: float,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch_max = batch_max
        self._expires_s = expires_s
        self._linger_s = linger_s
        self._clock_s = clock_s
        self._inbox = ""
        self._sub: Subscription | None = None
        self._buffer: list[Msg] = []
        self._first_at_s = 0.0
        # Open pull requests: reply inbox -> when the server ends it.
        self._open: dict[str, float] = {}
        self._credit = 0
        self._requests = 0
        self._changed = asyncio.Event()
        self.counts = {"pull_requests": 0, "pull_ends": 0}

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def aclose(self) -> None:
        """Unsubscribes; buffered messages are dropped unacked and come back
        after the consumer's ack_wait."""
        sub, self._sub = self._sub, None
        self._buffer.clear()
        self._open.clear()
        self._credit = 0
        if sub is not None and not self._nc.is_closed:
            await sub.unsubscribe()

    async def next_batch(self, wait_s: float) -> list[Msg]:
        """Up to batch_max messages; [] when none arrived within `wait_s`."""
        await self._top_up()
        if not self._buffer:
            await self._wait(wait_s, lambda: bool(self._buffer))
            if not self._buffer:
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

    def _batch_ready(self) -> bool:
        return len(self._buffer) >= self._batch_max or not self._credit

    async def _wait(self, timeout_s: float, done: Callable[[], bool]) -> None:
        """Until `done()` or the timeout. Not asyncio.wait_for: in Python 3.11
        it drops a cancellation that arrives as the event is set, and the
        consumer then pulled on after aclose cancelled it (a hang in tests
        with millisecond waits). A timer setting the event cannot do that."""
        loop = asyncio.get_running_loop()
        deadline_s = self._clock_s() + timeout_s
        while not done():
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
        now_s = self._clock_s()
        for reply, ends_s in list(self._open.items()):
            if now_s > ends_s + REQUEST_GRACE_S:
                self._end(reply, 0)
        need = self._batch_max - len(self._buffer) - self._credit
        if need <= 0 or (self._open and need < self._batch_max // MIN_REQUEST_FRACTION):
            return
        self._requests += 1
        reply = f"{self._inbox}.{self._requests}"
        self._open[reply] = now_s + self._expires_s
        self._credit += need
        body = _request_encoder.encode(
            _PullRequest(batch=need, expires=int(self._expires_s * 1e9)))
        await self._nc.publish(self._next_subject, body, reply=reply)
        self.counts["pull_requests"] += 1

    async def _on_msg(self, msg: Msg) -> None:
        # Delivered messages carry their own subject, not the request's
        # inbox, so credit is counted in total; status messages name theirs.
        if not msg.data and msg.headers and _STATUS_HEADER in msg.headers:
            if msg.headers[_STATUS_HEADER] != _HEARTBEAT_STATUS:
                self._end(msg.subject, int(msg.headers.get(_PENDING_HEADER, 0)))
            return
        self._credit = max(0, self._credit - 1)
        if not self._buffer:
            self._first_at_s = self._clock_s()
            self._changed.set()
        self._buffer.append(msg)
        if len(self._buffer) >= self._batch_max or not self._credit:
            self._changed.set()

    def _end(self, reply: str, unused_credit: int) -> None:
        if self._open.pop(reply, None) is None:
            return
        self.counts["pull_ends"] += 1
        # With no request open nothing more is coming, whatever was counted.
        self._credit = max(0, self._credit - unused_credit) if self._open else 0
        self._changed.set()
