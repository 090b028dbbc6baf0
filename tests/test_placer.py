"""The ingress placement client against a real nats-server, with scripted
scheduler stand-ins in the placement queue group: a lost actor is retried on
another, no actor at all is waited for within the timeout, a queued request
waits for its final answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.metrics import Metrics
from router.placer import _TIMED_OUT, ANSWERS_PER_PLACEMENT, Placer, _Answers
from scheduler.errors import NoCapacity
from scheduler.wire import (
    PLACE_QUEUE,
    Placement,
    PlaceQueued,
    PlaceRequest,
    encode,
    place_request_decoder,
    place_subject,
)
from tests.harness import nats_client

pytestmark = pytest.mark.integration
SUBJECT = place_subject("m")
# uvloop keeps time and timers in whole milliseconds: a wait may end that much early.
LOOP_CLOCK_SLACK_S = 0.005


@contextlib.asynccontextmanager
async def _placer(nc: NATS, timeout_s: float = 2.0) -> AsyncIterator[tuple[Placer, Metrics]]:
    """A started placer, closed however the test ends."""
    metrics = Metrics()
    placer = Placer(nc, timeout_s, attempt_timeout_s=0.2, metrics=metrics)
    await placer.start()
    try:
        yield placer, metrics
    finally:
        await placer.aclose()


def _req(max_queue_s: float = 0.0) -> PlaceRequest:
    return PlaceRequest(request_id="req-1", tenant_id="t", model="m", max_queue_s=max_queue_s)


def _placement(msg: Msg) -> bytes:
    req = place_request_decoder.decode(msg.data)
    return encode(Placement(request_id=req.request_id, replica_id="r", url="http://r"))


async def _actor(nc: NATS, on_request: Callable[[Msg], Awaitable[None]]) -> None:
    await nc.subscribe(SUBJECT, queue=PLACE_QUEUE, cb=on_request)
    await nc.flush()


def _retries(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("switchyard_placement_retries_total") or 0.0


async def test_a_lost_actor_is_retried_on_another(nc: NATS, private_bus: str) -> None:
    async with (_placer(nc) as (placer, metrics), nats_client(private_bus) as lost_actor,
                nats_client(private_bus) as other_actor, contextlib.AsyncExitStack() as tasks):
        lost = asyncio.Event()

        async def answering(msg: Msg) -> None:
            await msg.respond(_placement(msg))

        async def silent(msg: Msg) -> None:
            lost.set()

        async def replace_the_lost_actor() -> None:
            # It dies with the request; another one joins the group.
            await lost.wait()
            await lost_actor.close()
            await _actor(other_actor, answering)

        await _actor(lost_actor, silent)
        replacing = asyncio.create_task(replace_the_lost_actor())
        tasks.callback(replacing.cancel)
        started_s = time.monotonic()
        placement = await placer.place(SUBJECT, _req())
        await replacing
        assert isinstance(placement, Placement) and placement.request_id == "req-1"
        assert _retries(metrics) == 1
        assert time.monotonic() - started_s < 1.0


async def test_no_actor_is_waited_for_within_the_timeout(nc: NATS, private_bus: str) -> None:
    async with (_placer(nc) as (placer, metrics), nats_client(private_bus) as late,
                contextlib.AsyncExitStack() as tasks):

        async def answering(msg: Msg) -> None:
            await msg.respond(_placement(msg))

        async def join_later() -> None:
            await asyncio.sleep(0.3)
            await _actor(late, answering)

        joiner = asyncio.create_task(join_later())
        tasks.callback(joiner.cancel)
        assert isinstance(await placer.place(SUBJECT, _req()), Placement)
        assert _retries(metrics) >= 2
        await joiner


async def test_without_any_actor_it_is_no_capacity(nc: NATS) -> None:
    async with _placer(nc, timeout_s=0.3) as (placer, metrics):
        started_s = time.monotonic()
        with pytest.raises(NoCapacity) as failure:
            await placer.place(SUBJECT, _req())
        assert failure.value.retry_after_s == 1.0
        assert 0.25 < time.monotonic() - started_s < 1.0
        assert _retries(metrics) >= 2  # it kept looking for an actor until the deadline


@pytest.mark.parametrize(("answer_after_s", "placed"), [(0.5, True), (None, False)])
async def test_a_queued_request_waits_for_its_final_answer(
        nc: NATS, private_bus: str, answer_after_s: float | None, placed: bool) -> None:
    async with (_placer(nc, timeout_s=0.3) as (placer, metrics),
                nats_client(private_bus) as actor, contextlib.AsyncExitStack() as tasks):
        received: list[Msg] = []
        answers: list[asyncio.Task[None]] = []

        async def answer_later(msg: Msg, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            await msg.respond(_placement(msg))

        async def queueing(msg: Msg) -> None:
            received.append(msg)
            await actor.publish(msg.reply, encode(PlaceQueued(request_id="req-1")))
            if answer_after_s is not None:
                answers.append(asyncio.create_task(answer_later(msg, answer_after_s)))
                tasks.callback(answers[-1].cancel)

        await _actor(actor, queueing)
        started_s = time.monotonic()
        if placed:
            # Longer than the attempt and the placement timeouts, within max_queue_s.
            assert isinstance(await placer.place(SUBJECT, _req(max_queue_s=1.0)), Placement)
        else:
            with pytest.raises(NoCapacity):
                await placer.place(SUBJECT, _req(max_queue_s=0.4))
            assert time.monotonic() - started_s >= 0.7 - LOOP_CLOCK_SLACK_S
        assert len(received) == 1 and _retries(metrics) == 0
        await asyncio.gather(*answers)


async def test_answers_are_awaited_with_a_timer_and_none_is_lost() -> None:
    loop = asyncio.get_running_loop()
    answers = _Answers()
    heard = PlaceQueued(request_id="req-1")
    # Heard before anyone waits: the next wait has it at once.
    assert answers.put(heard)
    assert await answers.next(loop, 5.0) is heard
    # Nothing heard in time: the wait ends with the timer, and a later answer
    # waits for the next one.
    started_s = loop.time()
    assert await answers.next(loop, 0.05) is _TIMED_OUT
    assert loop.time() - started_s >= 0.04
    assert answers.put(None)
    assert await answers.next(loop, 5.0) is None
    # A waiter gets the answer as it arrives.
    waiting = asyncio.ensure_future(answers.next(loop, 5.0))
    await asyncio.sleep(0)
    answers.put(heard)
    assert await waiting is heard
    # A cancelled wait leaves nothing behind: the next one starts afresh.
    waiting = asyncio.ensure_future(answers.next(loop, 5.0))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert answers.put(heard) and await answers.next(loop, 5.0) is heard
    # Bounded: past ANSWERS_PER_PLACEMENT unread answers, put refuses.
    assert all(answers.put(heard) for _ in range(ANSWERS_PER_PLACEMENT))
    assert not answers.put(heard)
