"""Placement under saturation, at the NATS level: a real nats-server and
SchedulerService, placement requests sent with their own reply inbox. One
replica that takes two placements (max_num_seqs 1, waiting_requests 1) makes
the fleet saturated on demand; completion notices and load reports free it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from actors.control_store import ReplicaRegistry, connect_redis
from actors.scheduler import SchedulerService
from scheduler.config import Config, NatsConfig, RedisConfig, SaturationConfig, SchedulerConfig
from scheduler.wire import (
    DONE_SUBJECT,
    LoadSnapshot,
    PlaceDone,
    Placement,
    PlaceQueued,
    PlaceRejected,
    PlaceReply,
    PlaceRequest,
    ReplicaInfo,
    encode,
    load_subject,
    place_reply_decoder,
    place_subject,
)
from tests.harness import wait_until

pytestmark = pytest.mark.integration
MODEL = "m"
Start = Callable[..., Awaitable[SchedulerService]]


@pytest_asyncio.fixture
async def start_service(private_bus: str, redis_url: str) -> AsyncIterator[Start]:
    services: list[SchedulerService] = []

    async def start(**saturation: object) -> SchedulerService:
        sat = SaturationConfig(**{"max_num_seqs": 1, "waiting_requests": 1, **saturation})
        cfg = Config(nats=NatsConfig(url=private_bus),
                     redis=RedisConfig(url=redis_url.removesuffix("/0") + "/8"),
                     scheduler=SchedulerConfig(saturation=sat))
        async with connect_redis(cfg.redis) as redis:
            await redis.flushdb()
            await ReplicaRegistry(redis).put_replica(
                ReplicaInfo(id="a", url="http://127.0.0.1:1/a", models=(MODEL,)))
        svc = SchedulerService(cfg, random.Random(3))
        services.append(svc)
        await svc.start()
        return svc

    yield start
    for svc in services:
        await svc.aclose()


async def _send(nc: NATS, request_id: str, tenant: str = "t", priority: int = 0,
                max_queue_s: float = 10.0) -> Subscription:
    """Publishes a placement request with its own inbox; returns the inbox."""
    inbox = await nc.subscribe(nc.new_inbox())
    await nc.publish(place_subject(MODEL), encode(PlaceRequest(
        request_id=request_id, tenant_id=tenant, model=MODEL, priority=priority,
        max_queue_s=max_queue_s)), reply=inbox.subject)
    return inbox


async def _next(inbox: Subscription, timeout_s: float = 3.0) -> PlaceReply:
    msg = await inbox.next_msg(timeout=timeout_s)
    # Once, under heavy load, an empty message came: say what it was if it recurs.
    assert msg.data, f"empty message on {msg.subject}, headers {msg.headers}"
    return place_reply_decoder.decode(msg.data)


async def _queued(nc: NATS, request_id: str, **fields: object) -> Subscription:
    inbox = await _send(nc, request_id, **fields)
    assert await _next(inbox) == PlaceQueued(request_id=request_id)
    return inbox


async def _fill(nc: NATS) -> None:
    for request_id in ("r1", "r2"):
        assert isinstance(await _next(await _send(nc, request_id)), Placement)


async def _done(nc: NATS, request_id: str) -> None:
    await nc.publish(DONE_SUBJECT, encode(PlaceDone(request_id=request_id, replica_id="a",
                                                    model=MODEL)))


def _queued_total(svc: SchedulerService) -> int:
    return sum(v for k, v in svc.stats().items() if k.startswith("queued_priority_"))


async def test_saturated_fleet_queues_by_priority_and_takes_tenants_in_turn(
        start_service: Start, nc: NATS) -> None:
    svc = await start_service()
    await _fill(nc)
    inboxes = {rid: await _queued(nc, rid, tenant=tenant, priority=priority)
               for rid, tenant, priority in [("b1", "burst", 0), ("b2", "burst", 0),
                                             ("b3", "burst", 0), ("s1", "solo", 0),
                                             ("v1", "vip", 1)]}
    # Sheddable work and work that may not wait are refused at once, with Retry-After.
    for request_id, fields in [("shed", {"priority": -1}), ("now", {"max_queue_s": 0.0})]:
        refusal = await _next(await _send(nc, request_id, **fields))
        assert isinstance(refusal, PlaceRejected) and refusal.code == "no_capacity"
        assert refusal.retry_after_s == svc.cfg.scheduler.saturation.retry_after_s
    stats = svc.stats()
    assert stats["queued_priority_0"] == 4 and stats["queued_priority_1"] == 1
    assert stats["shed"] == 2

    # Each completion frees one slot: the vip first, then the tenants in turn.
    order = []
    for done in ("r1", "r2", "v1", "b1", "s1"):
        await _done(nc, done)
        placed = None
        while placed is None:
            for rid, inbox in inboxes.items():
                if inbox.pending_msgs and rid not in order:
                    reply = await _next(inbox)
                    assert isinstance(reply, Placement) and reply.replica_id == "a"
                    placed = rid
            if placed is None:
                await nc.flush()
        order.append(placed)
    assert order == ["v1", "b1", "s1", "b2", "b3"]
    assert _queued_total(svc) == 0 and svc.stats()["dequeued"] == 5


async def test_deadline_and_caps_answer_503_and_429_on_the_same_inbox(
        start_service: Start, nc: NATS) -> None:
    svc = await start_service(tenant_queue_cap_requests=2, queue_cap_requests=3,
                              retry_after_s=3.0)
    await _fill(nc)
    waits = await _queued(nc, "t1", max_queue_s=0.3)
    second = await _queued(nc, "t2")
    over_share = await _next(await _send(nc, "t3"))
    assert isinstance(over_share, PlaceRejected) and over_share.code == "queue_full"
    assert over_share.retry_after_s == 3.0
    await _queued(nc, "u1", tenant="u")
    # Over the total cap (3): the newest entry of the tenant holding most of
    # the lowest band is pushed out, on its own inbox.
    await _queued(nc, "w1", tenant="w", priority=1)
    pushed_out = await _next(second)
    assert isinstance(pushed_out, PlaceRejected) and pushed_out.code == "queue_full"
    timed_out = await _next(waits, timeout_s=3.0)
    assert isinstance(timed_out, PlaceRejected) and timed_out.code == "queue_timeout"
    assert timed_out.retry_after_s == 3.0
    stats = svc.stats()
    assert (stats["queue_full"], stats["queue_timeout"]) == (2, 1)
    assert (stats["queued_priority_0"], stats["queued_priority_1"]) == (1, 1)


async def test_load_reports_saturate_and_free_the_fleet_and_a_notice_drops_a_waiter(
        start_service: Start, nc: NATS) -> None:
    svc = await start_service(max_num_seqs=256, waiting_requests=5)
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="a", model=MODEL, healthy=True, running=256, waiting=5)))

    async def heard() -> bool:
        return svc.counts["load_reports"] == 1

    await wait_until(heard, timeout_s=5)
    gone = await _queued(nc, "gone")
    stays = await _queued(nc, "stays")
    # The client of "gone" left: its completion notice drops it from the queue.
    await _done(nc, "gone")

    async def cancelled() -> bool:
        return svc.stats()["queue_cancelled"] == 1

    await wait_until(cancelled, timeout_s=5)
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="a", model=MODEL, healthy=True, running=3, waiting=0)))
    placed = await _next(stays)
    assert isinstance(placed, Placement) and placed.request_id == "stays"
    await nc.flush()
    assert gone.pending_msgs == 0 and _queued_total(svc) == 0
