"""JetStream publishes in batches (router/batch_publish.py) against a real
nats-server: every message acked and stored once per id, a repeated id acked
without a second copy, a subject no stream takes refused at once, and a
reply that never comes given up on at the timeout."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from router.batch_publish import BatchPublisher

pytestmark = pytest.mark.integration


async def test_a_batch_is_acked_and_stored_once_per_id(nc: NATS) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BATCH", subjects=["batch.>"]))
    publisher = BatchPublisher(nc)
    await publisher.start()
    try:
        first = [(f"batch.t{i % 2}", b'{"n":%d}' % i, f"req-{i}") for i in range(5)]
        assert await publisher.publish(first, timeout_s=2.0) == [True] * 5
        # The same ids again (a spooled copy), and one new: all acked, one more stored.
        again = [*first[:3], ("batch.t0", b'{"n":5}', "req-5")]
        assert await publisher.publish(again, timeout_s=2.0) == [True] * 4
        assert (await js.stream_info("BATCH")).state.messages == 6
        assert await publisher.publish([], timeout_s=2.0) == []
    finally:
        await publisher.aclose()
        await js.delete_stream("BATCH")


async def test_without_a_stream_nothing_is_acked(nc: NATS) -> None:
    publisher = BatchPublisher(nc)
    await publisher.start()
    try:
        started_s = time.monotonic()
        # No stream takes the subject: the server says so at once (no responders).
        assert await publisher.publish([("nostream.a", b"{}", "a"), ("nostream.b", b"{}", "b")],
                                       timeout_s=5.0) == [False, False]
        assert time.monotonic() - started_s < 2.0
    finally:
        await publisher.aclose()


async def test_an_ack_that_never_comes_times_out(nc: NATS) -> None:
    heard: list[Msg] = []

    async def silent(msg: Msg) -> None:
        heard.append(msg)

    sub = await nc.subscribe("silent.>", cb=silent)
    publisher = BatchPublisher(nc)
    await publisher.start()
    try:
        started_s = time.monotonic()
        assert await publisher.publish([("silent.a", b"{}", "a")], timeout_s=0.3) == [False]
        assert 0.25 < time.monotonic() - started_s < 2.0
        assert heard and heard[0].headers == {"Nats-Msg-Id": "a"}
    finally:
        await sub.unsubscribe()
        await publisher.aclose()
