"""The ingress side of placement over NATS.

One wildcard reply subscription per ingress (router/reply_inbox.py); each
placement in flight has its own reply subject under it and a small buffer of
the answers heard there, awaited through one future and one loop timer (not
`asyncio.wait_for`, which costs a task per wait in Python 3.11: this is on
every request's path). A scheduler actor answers with the final Placement
or PlaceRejected, or first with PlaceQueued when the request waits in its
fair queue (then the wait extends to the request's `max_queue_s` plus the
placement timeout). An actor that does not answer within the per-attempt
timeout (it died, or hangs), or no actor at all, gets the same request again
(same request id), which the queue group hands to another actor; all attempts
share the reply subject, so the first answer wins. An actor that counted an
abandoned attempt is released by the request's completion notice, as ever.

A placement no actor answered at all (nothing heard by the deadline, no
responders, or NATS refusing the publish) raises SchedulerUnreachable, which
the gateway may answer by placing the request itself (router/fallback.py);
one that waited in a fair queue and timed out is a plain NoCapacity.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.metrics import Metrics
from router.reply_inbox import ReplyInbox, no_responders, reply_token
from scheduler.errors import NoCapacity, SchedulerUnreachable
from scheduler.wire import (
    Placement,
    PlaceQueued,
    PlaceRejected,
    PlaceRequest,
    encode,
    place_reply_decoder,
)

log = logging.getLogger("switchyard.placer")
# With no actor subscribed at all, look again this often (one may be restarting).
NO_RESPONDERS_BACKOFF_S = 0.05
# Answers one placement can get: a final one and a PlaceQueued per attempt.
ANSWERS_PER_PLACEMENT = 16
NO_SCHEDULER = "No scheduler is serving placements right now."

# What a placement's buffer holds: an answer, or None for "no responders".
_Answer = Placement | PlaceRejected | PlaceQueued | None
# What a wait for the next answer gives when its time ran out.
_TIMED_OUT = object()


class _Answers:
    """The answers heard on one placement's reply subject, and the wait for the next."""

    __slots__ = ("_heard", "_waiter")

    def __init__(self) -> None:
        self._heard: deque[_Answer] = deque()
        self._waiter: asyncio.Future[object] | None = None

    def put(self, answer: _Answer) -> bool:
        """False when the buffer is full (the answer is dropped)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        elif len(self._heard) < ANSWERS_PER_PLACEMENT:
            self._heard.append(answer)
        else:
            return False
        return True

    async def next(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> object:
        """The next answer, or _TIMED_OUT after `timeout_s`."""
        if self._heard:
            return self._heard.popleft()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class Placer:
    def __init__(self, nc: NATS, timeout_s: float, attempt_timeout_s: float,
                 metrics: Metrics) -> None:
        self._nc = nc
        self._timeout_s = timeout_s
        self._attempt_timeout_s = attempt_timeout_s
        self._metrics = metrics
        self._inbox = ReplyInbox(nc, self._on_answer)
        self._pending: dict[str, _Answers] = {}

    async def start(self) -> None:
        await self._inbox.start()

    async def aclose(self) -> None:
        await self._inbox.aclose()

    async def place(self, subject: str, req: PlaceRequest) -> Placement | PlaceRejected:
        """The scheduler's final answer; NoCapacity when none came in time."""
        token, reply_to = self._inbox.new_reply()
        answers = self._pending[token] = _Answers()
        try:
            return await self._attempts(subject, encode(req), reply_to,
                                        answers, req.max_queue_s)
        finally:
            del self._pending[token]

    async def _attempts(self, subject: str, payload: bytes, reply_to: str,
                        answers: _Answers, max_queue_s: float) -> Placement | PlaceRejected:
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self._timeout_s
        queued = False
        await self._send(subject, payload, reply_to)
        while True:
            left_s = deadline_s - loop.time()
            # Once queued, the actor holding the request answers; no resend.
            answer = await answers.next(loop, max(0.0, left_s if queued
                                                  else min(left_s, self._attempt_timeout_s)))
            if answer is _TIMED_OUT:
                if queued:
                    raise self._failed("Placement timed out.")
                if loop.time() >= deadline_s:
                    raise self._unreachable("No scheduler answered in time.")
                await self._resend(subject, payload, reply_to)
                continue
            if answer is None:
                if loop.time() + NO_RESPONDERS_BACKOFF_S >= deadline_s:
                    raise self._unreachable(NO_SCHEDULER)
                await asyncio.sleep(NO_RESPONDERS_BACKOFF_S)
                await self._resend(subject, payload, reply_to)
            elif isinstance(answer, PlaceQueued):
                if not queued:
                    queued = True
                    deadline_s = max(deadline_s, loop.time() + max_queue_s + self._timeout_s)
            else:
                return answer

    async def _resend(self, subject: str, payload: bytes, reply_to: str) -> None:
        self._metrics.placement_retries.inc()
        await self._send(subject, payload, reply_to)

    async def _send(self, subject: str, payload: bytes, reply_to: str) -> None:
        try:
            await self._nc.publish(subject, payload, reply=reply_to)
        except nats.errors.Error as exc:
            raise self._unreachable(f"Placement failed: {type(exc).__name__}.") from None

    def _failed(self, message: str) -> NoCapacity:
        self._metrics.nats_errors.inc()
        return NoCapacity(message, retry_after_s=1.0)

    def _unreachable(self, message: str) -> SchedulerUnreachable:
        self._metrics.nats_errors.inc()
        return SchedulerUnreachable(message, retry_after_s=1.0)

    async def _on_answer(self, msg: Msg) -> None:
        answers = self._pending.get(reply_token(msg))
        if answers is None:
            return  # a late answer to a placement already decided or given up
        answer: _Answer
        if no_responders(msg):
            answer = None
        else:
            try:
                answer = place_reply_decoder.decode(msg.data)
            except msgspec.DecodeError:
                self._metrics.nats_errors.inc()
                log.warning("malformed placement answer dropped")
                return
        if not answers.put(answer):
            self._metrics.nats_errors.inc()
