"""JetStream publishes of the ingress's usage events, a batch at a time:
still one JetStream message per event, with its own `Nats-Msg-Id`, but all
of a batch handed to the connection together (one socket write for the
batch) and their acks awaited together, under one timer.

nats-py's `js.publish` is a request per event: an inbox future awaited with
`asyncio.wait_for` (a task per event in Python 3.11) and an ack decoded with
`json` into a dataclass. Here every ack comes back on one wildcard
subscription of this publisher's own inbox and is decoded with msgspec.

The ack is JetStream's own reply (its PubAck or an API error), not one of
switchyard's messages, so its shape is read here, where it is used."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.reply_inbox import ReplyInbox, no_responders, reply_token


class _PubAck(msgspec.Struct):
    """A JetStream publish ack: the stream that stored the message, or an error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, object] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class _Batch:
    __slots__ = ("acked", "done", "left")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.acked = [False] * size
        self.left = size
        self.done = done

    def answered(self, index: int, acked: bool) -> None:
        self.acked[index] = acked
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)


class BatchPublisher:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._inbox = ReplyInbox(nc, self._on_ack)
        # Reply token -> (its batch, the message's index in it).
        self._pending: dict[str, tuple[_Batch, int]] = {}

    async def start(self) -> None:
        await self._inbox.start()

    async def aclose(self) -> None:
        await self._inbox.aclose()

    async def publish(self, messages: Sequence[tuple[str, bytes, str]],
                      timeout_s: float) -> list[bool]:
        """Publishes each (subject, payload, message id); whether JetStream
        acked each one within `timeout_s` (a duplicate id is acked too). An
        unacked message may have been stored all the same: publish it again
        under the same id."""
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        batch = _Batch(len(messages), loop.create_future())
        tokens = []
        try:
            for index, (subject, payload, msg_id) in enumerate(messages):
                token, reply = self._inbox.new_reply()
                self._pending[token] = (batch, index)
                tokens.append(token)
                await self._nc.publish(subject, payload, reply=reply,
                                       headers={"Nats-Msg-Id": msg_id})
            timer = loop.call_later(timeout_s, _expire, batch.done)
            try:
                await batch.done
            finally:
                timer.cancel()
        except nats.errors.Error:
            pass  # what was not acked stays False
        finally:
            for token in tokens:
                self._pending.pop(token, None)
        return batch.acked

    async def _on_ack(self, msg: Msg) -> None:
        found = self._pending.pop(reply_token(msg), None)
        if found is None:
            return  # the ack of a batch that gave up waiting
        batch, index = found
        if no_responders(msg):  # no stream takes the subject
            batch.answered(index, False)
            return
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError:
            batch.answered(index, False)
            return
        batch.answered(index, ack.error is None and bool(ack.stream))


def _expire(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
