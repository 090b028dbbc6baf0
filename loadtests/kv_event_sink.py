"""A KV-cache event subscriber for tests and captures: a SUB socket bound on
loopback, which vLLM's publishers connect to, recording every message by
topic; and a replay request to one publisher's ROUTER socket.

A receive is kept pending from the moment the socket is bound: libzmq sends a
SUB socket's subscription to a newly connected publisher only while the socket
is being serviced, and the PUB side drops everything until it has that
subscription. An idle SUB socket silently loses a replica's first batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from scheduler.kv_events import END_SEQ, decode_seq, encode_seq

# The sequence number of the frame that ends a replay.
REPLAY_END_SEQ = decode_seq(END_SEQ)

class KvMessage(msgspec.Struct, frozen=True):
    """One message as sent: topic, sequence number, msgpack payload."""

    topic: str
    seq: int
    payload: bytes


def _message(frames: list[bytes]) -> KvMessage:
    topic, seq, payload = frames
    return KvMessage(topic.decode(), decode_seq(seq), payload)


class KvEventSink:
    """Records at most `max_messages`, counting the rest as dropped."""

    def __init__(self, max_messages: int = 10_000) -> None:
        self.max_messages = max_messages
        self.dropped_messages = 0
        self.malformed_messages = 0
        self.endpoint = ""
        self._by_topic: dict[str, list[KvMessage]] = {}
        self._count = 0
        self._arrived = asyncio.Condition()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sock.subscribe(b"")
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._receive(), name="kv-event-sink")

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 3:
                self.malformed_messages += 1
                continue
            if self._count >= self.max_messages:
                self.dropped_messages += 1
                continue
            message = _message(frames)
            self._by_topic.setdefault(message.topic, []).append(message)
            self._count += 1
            async with self._arrived:
                self._arrived.notify_all()

    def messages(self, topic: str) -> list[KvMessage]:
        return list(self._by_topic.get(topic, []))

    async def wait_for(self, topic: str, done: Callable[[list[KvMessage]], bool],
                       timeout_s: float) -> list[KvMessage]:
        """The messages of `topic` once `done` holds for them."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: done(self.messages(topic))), timeout_s)
        return self.messages(topic)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close(linger=0)
        self._ctx.term()


async def replay(endpoint: str, start_seq: int, timeout_s: float) -> list[KvMessage]:
    """The batches a publisher still buffers from `start_seq` on: a DEALER
    sends `[b"", seq]`, the ROUTER answers `[b"", topic, seq, payload]` per
    batch and ends with seq -1."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
        await sock.send_multipart([b"", encode_seq(start_seq)])
        batches: list[KvMessage] = []
        async with asyncio.timeout(timeout_s):
            while (message := _message((await sock.recv_multipart())[1:])).seq != REPLAY_END_SEQ:
                batches.append(message)
        return batches
    finally:
        sock.close(linger=0)
        ctx.term()
