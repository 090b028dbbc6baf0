"""RELIABILITY T33, the back-pressure half. Nothing on the request path calls
a Ray actor handle (the ingress reaches the scheduler and quota actors over
NATS), so `max_pending_calls` has nothing to bound there; what can be flooded
is a scheduler actor's placement subscription. Flooded past
`scheduler.place_backlog_max`, it refuses the placements that waited longest
at once (PlaceRejected `scheduler_overloaded`, which the ingress answers with
503 and Retry-After) instead of answering everyone late. On a private
nats-server and Redis database."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.control_store import ReplicaRegistry, connect_redis
from actors.scheduler import SchedulerService
from scheduler.config import Config, NatsConfig, RedisConfig
from scheduler.config_scheduler import SchedulerConfig
from scheduler.errors import PLACEMENT_ERRORS, SchedulerOverloaded
from scheduler.wire import (
    Placement,
    PlaceRejected,
    PlaceRequest,
    ReplicaInfo,
    encode,
    place_reply_decoder,
    place_subject,
)

pytestmark = pytest.mark.integration
MODEL = "m"
REDIS_DB = 27
FLOOD_REQUESTS = 3_000
BACKLOG_MAX = 64


async def _service(bus: str, redis_url: str, backlog_max: int) -> SchedulerService:
    cfg = Config(nats=NatsConfig(url=bus),
                 redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}"),
                 scheduler=SchedulerConfig(metrics_port=0, place_backlog_max=backlog_max))
    async with connect_redis(cfg.redis) as redis:
        await redis.flushdb()
        for rid in ("a", "b"):
            await ReplicaRegistry(redis).put_replica(
                ReplicaInfo(id=rid, url=f"http://127.0.0.1:1/{rid}", models=(MODEL,)))
    svc = SchedulerService(cfg, random.Random(5), actor_id="sched-flooded")
    await svc.start()
    return svc


async def _flood(nc: NATS) -> tuple[dict[str, Placement | PlaceRejected], list[float]]:
    """Sends FLOOD_REQUESTS placements in one burst; returns every answer by
    request id and each answer's latency."""
    sent_s: dict[str, float] = {}
    answers: dict[str, Placement | PlaceRejected] = {}
    latencies_s: list[float] = []
    all_in = asyncio.Event()

    async def on_answer(msg: Msg) -> None:
        answer = place_reply_decoder.decode(msg.data)
        assert isinstance(answer, Placement | PlaceRejected)
        answers[answer.request_id] = answer
        latencies_s.append(time.monotonic() - sent_s[answer.request_id])
        if len(answers) == FLOOD_REQUESTS:
            all_in.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox + ".*", cb=on_answer)
    try:
        for i in range(FLOOD_REQUESTS):
            request_id = f"flood-{i}"
            sent_s[request_id] = time.monotonic()
            await nc.publish(place_subject(MODEL), encode(PlaceRequest(
                request_id=request_id, tenant_id="t", model=MODEL)), reply=f"{inbox}.{i}")
        await nc.flush()
        await asyncio.wait_for(all_in.wait(), timeout=60)
    finally:
        await sub.unsubscribe()
    return answers, latencies_s


async def _flooded(bus: str, redis_url: str, nc: NATS, backlog_max: int
                   ) -> AsyncIterator[tuple[SchedulerService, dict[str, Placement | PlaceRejected],
                                            list[float]]]:
    svc = await _service(bus, redis_url, backlog_max)
    try:
        answers, latencies_s = await _flood(nc)
        yield svc, answers, latencies_s
    finally:
        await svc.aclose()


async def test_a_flooded_scheduler_refuses_at_once_and_answers_everyone(
        private_bus: str, redis_url: str, nc: NATS) -> None:
    async for svc, answers, latencies_s in _flooded(private_bus, redis_url, nc, BACKLOG_MAX):
        shed = [a for a in answers.values() if isinstance(a, PlaceRejected)]
        placed = [a for a in answers.values() if isinstance(a, Placement)]
        assert len(shed) + len(placed) == FLOOD_REQUESTS
        assert shed and placed
        assert {a.code for a in shed} == {"scheduler_overloaded"}
        assert all(a.retry_after_s for a in shed)
        assert svc.counts["shed"] == len(shed)
        assert svc.counts["placed"] == len(placed)
        limited_max_s = max(latencies_s)
        # The flood is over: the next placement is placed.
        msg = await nc.request(place_subject(MODEL), encode(PlaceRequest(
            request_id="after", tenant_id="t", model=MODEL)), timeout=2)
        assert isinstance(place_reply_decoder.decode(msg.data), Placement)
    # Negative control: without the bound the same flood is all taken up,
    # late (placed, or refused by saturation once the replicas fill up).
    async for svc, answers, latencies_s in _flooded(private_bus, redis_url, nc, 0):
        assert svc.counts["shed"] == 0
        assert "scheduler_overloaded" not in {
            a.code for a in answers.values() if isinstance(a, PlaceRejected)}
        print(f"\nflood of {FLOOD_REQUESTS}: slowest answer {limited_max_s * 1e3:.0f} ms with "
              f"place_backlog_max={BACKLOG_MAX} ({len(shed)} refused), "
              f"{max(latencies_s) * 1e3:.0f} ms without")


def test_the_ingress_answers_scheduler_overloaded_with_503_and_retry_after() -> None:
    rejected = PlaceRejected(request_id="r", code="scheduler_overloaded", message="busy",
                             retry_after_s=1.0)
    error = PLACEMENT_ERRORS[rejected.code](rejected.message,
                                            retry_after_s=rejected.retry_after_s)
    assert isinstance(error, SchedulerOverloaded)
    assert error.status == 503
    assert error.body()["error"]["code"] == "scheduler_overloaded"
    # The error middleware writes Retry-After from it.
    assert error.retry_after_s == 1.0
