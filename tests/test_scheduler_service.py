"""The scheduler's NATS shell keeps its core current from what replica agents
publish: load snapshots gate health and draining, relayed KV events fill the
precise prefix index, a resync empties it. On a private nats-server and
Redis database, so the session's scheduler actor is not involved."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from actors.control_store import ReplicaRegistry, connect_redis
from actors.scheduler import SchedulerService
from deploy.procs import LOOPBACK, free_port
from scheduler.config import Config, NatsConfig, RedisConfig
from scheduler.kv_events import BlockStored, KVEventBatch, encode_batch
from scheduler.wire import (
    REPLICA_FAILED_SUBJECT,
    KvEventsRelay,
    KvResync,
    LoadSnapshot,
    Placement,
    PlaceRequest,
    ReplicaFailed,
    ReplicaInfo,
    encode,
    kv_subject,
    load_subject,
    place_reply_decoder,
    place_subject,
)
from tests.harness import wait_until

pytestmark = pytest.mark.integration
MODEL = "m"


@pytest_asyncio.fixture
async def service(private_bus: str, redis_url: str) -> AsyncIterator[SchedulerService]:
    cfg = Config(nats=NatsConfig(url=private_bus),
                 redis=RedisConfig(url=redis_url.removesuffix("/0") + "/2"))
    redis = connect_redis(cfg.redis)
    await redis.flushdb()
    for rid in ("a", "b"):
        await ReplicaRegistry(redis).put_replica(
            ReplicaInfo(id=rid, url=f"http://127.0.0.1:1/{rid}", models=(MODEL,)))
    await redis.aclose()
    svc = SchedulerService(cfg, random.Random(3), actor_id="sched-test",
                           metrics_port=free_port())
    await svc.start()
    yield svc
    await svc.aclose()


async def _place(nc: NATS, request_id: str) -> str:
    msg = await nc.request(place_subject(MODEL), encode(PlaceRequest(
        request_id=request_id, tenant_id="t", model=MODEL)), timeout=2)
    decision = place_reply_decoder.decode(msg.data)
    assert isinstance(decision, Placement)
    return decision.replica_id


async def test_unhealthy_and_draining_replicas_get_nothing(
        service: SchedulerService, nc: NATS) -> None:
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="a", model=MODEL, healthy=False)))
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="b", model=MODEL, healthy=True, running=3)))

    async def heard() -> bool:
        return service.counts["load_reports"] == 2

    await wait_until(heard, timeout_s=5)
    assert {await _place(nc, f"r{i}") for i in range(6)} == {"b"}
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="a", model=MODEL, healthy=True)))
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="b", model=MODEL, healthy=True, draining=True)))

    async def heard_again() -> bool:
        return service.counts["load_reports"] == 4

    await wait_until(heard_again, timeout_s=5)
    assert {await _place(nc, f"s{i}") for i in range(6)} == {"a"}


async def test_relayed_kv_events_fill_the_index_and_a_resync_empties_it(
        service: SchedulerService, nc: NATS) -> None:
    stored = BlockStored(block_hashes=[11, 12, 13], parent_block_hash=None,
                         token_ids=list(range(96)), block_size=32, lora_id=None,
                         medium="GPU", lora_name=None)
    payload = encode_batch(KVEventBatch(ts=0.0, events=[stored]))
    await nc.publish(kv_subject(MODEL, "a"), encode(KvEventsRelay(
        replica_id="a", model=MODEL, seq=0, payload=payload)))
    await nc.publish(kv_subject(MODEL, "ghost"), encode(KvEventsRelay(
        replica_id="ghost", model=MODEL, seq=0, payload=payload)))

    async def indexed() -> bool:
        return service.counts["kv_batches"] == 1 and service.counts["unknown_replica"] == 1

    await wait_until(indexed, timeout_s=5)
    sizes = {k: v for k, v in service.stats().items() if k.startswith("index_")}
    assert sum(sizes.values()) >= 3, sizes
    exported = await _scrape_sizes(service.metrics_port)
    assert {k: v for k, v in exported.items() if k.startswith("index_")} == sizes
    await nc.publish(kv_subject(MODEL, "a"), encode(KvResync(
        replica_id="a", model=MODEL, reason="restart")))

    async def emptied() -> bool:
        return service.counts["kv_resyncs"] == 1

    await wait_until(emptied, timeout_s=5)
    after = {k: v for k, v in service.stats().items() if k.startswith("index_")}
    assert sum(after.values()) == sum(sizes.values()) - 3, after


async def _scrape_sizes(port: int) -> dict[str, float]:
    """The scheduler's own /metrics: its bounded parts' sizes, by part."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://{LOOPBACK}:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    prefix = 'switchyard_scheduler_size{actor="sched-test",part="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


async def test_garbage_is_counted_not_fatal(service: SchedulerService, nc: NATS) -> None:
    await nc.publish(load_subject(MODEL), b"{not json")
    await nc.publish(kv_subject(MODEL, "a"), msgspec.json.encode({"kind": "kv"}))

    async def counted() -> bool:
        return service.counts["malformed"] == 2

    await wait_until(counted, timeout_s=5)
    assert await _place(nc, "after-garbage") in {"a", "b"}


async def test_a_replica_whose_agent_goes_quiet_is_taken_as_unhealthy(
        service: SchedulerService, nc: NATS) -> None:
    await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
        replica_id="a", model=MODEL, healthy=True)))

    async def heard() -> bool:
        return service.counts["load_reports"] == 1

    await wait_until(heard, timeout_s=5)
    # "b" has no agent at all: left as it is. "a" stops reporting.
    stale_s = service.cfg.scheduler.load_stale_s
    assert service.core.mark_stale(service.clock_s() + stale_s + 1, stale_s) == ["a"]
    assert {await _place(nc, f"q{i}") for i in range(6)} == {"b"}


async def test_a_failed_replica_is_ejected_until_the_period_and_a_healthy_report(
        service: SchedulerService, nc: NATS) -> None:
    now_s = [1_000.0]
    service.clock_s = lambda: now_s[0]

    async def report(replica_id: str, count: int) -> None:
        await nc.publish(load_subject(MODEL), encode(LoadSnapshot(
            replica_id=replica_id, model=MODEL, healthy=True)))
        await _counted(service, "load_reports", count)

    await report("a", 1)
    await report("b", 2)
    await nc.publish(REPLICA_FAILED_SUBJECT, encode(ReplicaFailed(
        replica_id="a", request_id="r0", reason="connection refused")))
    await _counted(service, "ejections", 1)
    assert {await _place(nc, f"e{i}") for i in range(4)} == {"b"}
    now_s[0] += 1.0  # within the period: a healthy report does not re-admit
    await report("a", 3)
    assert {await _place(nc, f"p{i}") for i in range(4)} == {"b"}
    now_s[0] += service.cfg.scheduler.ejection.base_s
    await report("a", 4)
    assert await _place(nc, "back") == "a"  # b holds eight in flight, a none


async def _counted(service: SchedulerService, name: str, count: int) -> None:
    async def reached() -> bool:
        return service.counts[name] == count

    await wait_until(reached, timeout_s=5)
