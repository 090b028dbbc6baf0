"""Quota shard actors (real Ray actors, NATS, Redis database 13) and the
ingress's quota client: exact limits across two ingresses, the budget under
a concurrent burst, failing closed, and a shard killed under load (T32)."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio

from actors.control_plane import TENANT_KEY
from actors.control_store import connect_redis
from actors.quota import QuotaService
from actors.tenancy_reader import LIMITS_FIELD, PRICES_KEY
from analytics.metering_client import MeteringClient
from deploy.procs import free_port
from router.quota_client import Admission, QuotaClient
from scheduler.config import (
    ClickHouseConfig,
    Config,
    MeteringConfig,
    NatsConfig,
    RedisConfig,
    dump_config,
)
from scheduler.errors import (
    BudgetExhausted,
    ModelNotPriced,
    QuotaUnavailable,
    RateLimited,
    YardError,
)
from scheduler.quota_ledger import TenantLedger
from scheduler.quota_terms import QuotaConfig, shard_of
from scheduler.tenancy import NUSD_PER_USD, Price, TenantLimits
from scheduler.wire import (
    QuotaCommit,
    QuotaReply,
    QuotaReserve,
    encode,
    quota_reply_decoder,
    quota_subject,
)
from scheduler.wire.usage import UsageRowsQuery
from tests.harness import nats_client, wait_until

pytestmark = pytest.mark.integration
REDIS_DB = 9
SHARDS = 2
MODEL = "priced-model"
# $1 per million output tokens, $0.5 per million prompt tokens.
PRICE = Price(effective_from_s=0, input_nusd_per_token=500, cached_input_nusd_per_token=50,
              output_nusd_per_token=1_000)


@dataclass
class Quotas:
    cfg: Config
    shards: list[Any]

    async def tenant(self, limits: TenantLimits) -> str:
        tenant_id = "t-" + uuid.uuid4().hex[:10]
        async with connect_redis(self.cfg.redis) as redis:
            await redis.hset(TENANT_KEY.format(tenant_id=tenant_id), mapping={
                "name": tenant_id, "status": "active",
                LIMITS_FIELD: msgspec.json.encode(limits).decode()})
        return tenant_id

    async def ledger(self, tenant_id: str) -> TenantLedger:
        """The tenant's ledger as Redis holds it (what a restarted shard reads)."""
        async with connect_redis(self.cfg.redis) as redis:
            fields = await redis.hgetall(self.cfg.quota.redis_prefix + tenant_id)
        return TenantLedger.restore(fields, time.time())

    def owner(self, tenant_id: str) -> Any:
        return self.shards[shard_of(tenant_id, SHARDS)]


@pytest_asyncio.fixture(scope="module")
async def quotas(private_bus: str, redis_url: str, session_dir: Path,
                 ray_cluster: None) -> AsyncIterator[Quotas]:
    from actors.ray_shells import MeteringActor, QuotaShardActor

    # The metering service answers a budget tenant's billed spend, which a
    # shard reads before its first admission (none billed here: 0).
    cfg = Config(nats=NatsConfig(url=private_bus),
                 redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}"),
                 metering=MeteringConfig(clickhouse=ClickHouseConfig(
                     path=str(session_dir / "quota-actors-chdb"))),
                 quota=QuotaConfig(shards=SHARDS))
    redis = connect_redis(cfg.redis)
    await redis.flushdb()
    await redis.hset(PRICES_KEY, MODEL, msgspec.json.encode((PRICE,)).decode())
    await redis.aclose()
    shards = [QuotaShardActor.options(name=f"quota-test-{uuid.uuid4().hex[:8]}-{i}").remote(
        dump_config(cfg), i) for i in range(SHARDS)]
    metering = MeteringActor.remote(dump_config(cfg))
    await asyncio.gather(*(asyncio.wait_for(a.ready.remote(), 120) for a in [*shards, metering]))
    async with nats_client(cfg.nats.url) as nc:
        # Its first query (chDB warming up) may take longer than an admission waits.
        await MeteringClient(nc, timeout_s=60).usage_rows(UsageRowsQuery(from_ms=0, to_ms=60_000))
    yield Quotas(cfg, shards)
    await asyncio.gather(*(asyncio.wait_for(a.stop.remote(), 10) for a in [*shards, metering]))


@pytest_asyncio.fixture
async def ingresses(quotas: Quotas) -> AsyncIterator[list[QuotaClient]]:
    """Two quota clients on connections of their own, as two ingresses."""
    conns = [await nats.connect(quotas.cfg.nats.url) for _ in range(2)]
    clients = [QuotaClient(nc, quotas.cfg.quota) for nc in conns]
    for client in clients:
        await client.start()
    yield clients
    for client in clients:
        await client.aclose()
    for nc in conns:
        await nc.drain()


async def _admit_all(clients: list[QuotaClient], tenant_id: str, attempts: int,
                     concurrency: int, max_tokens: int = 10
                     ) -> tuple[list[tuple[QuotaClient, Admission]], collections.Counter[str]]:
    """`attempts` admissions, `concurrency` at a time, spread over the clients;
    what each admitted, and the refusals by kind."""
    admitted: list[tuple[QuotaClient, Admission]] = []
    refused: collections.Counter[str] = collections.Counter()
    left = iter(range(attempts))

    async def worker(client: QuotaClient) -> None:
        for _ in left:
            try:
                admitted.append((client, await client.admit(
                    tenant_id, uuid.uuid4().hex, MODEL, prompt_tokens=5, max_tokens=max_tokens)))
            except YardError as exc:
                refused[type(exc).__name__] += 1

    await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
    return admitted, refused


async def test_two_ingresses_admit_exactly_the_requests_per_minute(
        quotas: Quotas, ingresses: list[QuotaClient]) -> None:
    tenant_id = await quotas.tenant(TenantLimits(requests_per_minute=100))
    admitted, refused = await _admit_all(ingresses, tenant_id, attempts=300, concurrency=64)
    for client, adm in admitted:
        client.settle(adm, 5, 0, 3)
    # Leases still held go back with what they did not use; that is admitted next.
    for client in ingresses:
        await client.aclose()
        await client.start()
    more, _ = await _admit_all(ingresses, tenant_id, attempts=150, concurrency=16)
    assert len(admitted) + len(more) == 100, (len(admitted), len(more), refused)
    assert set(refused) == {"RateLimited"}
    assert sum(c.counts["local"] for c in ingresses) > 0, "no admission used a lease"
    ledger = await quotas.ledger(tenant_id)
    assert ledger.window_requests == 100


async def test_a_budget_holds_under_a_burst_and_nothing_stays_reserved(
        quotas: Quotas, ingresses: list[QuotaClient]) -> None:
    tenant_id = await quotas.tenant(TenantLimits(budget_nusd=NUSD_PER_USD))
    # 100k output tokens at $1/Mtok: each request reserves $0.10.
    admitted, refused = await _admit_all(ingresses, tenant_id, attempts=200, concurrency=200,
                                         max_tokens=100_000)
    assert len(admitted) <= 10 and set(refused) == {"BudgetExhausted"}, refused
    rng = random.Random(7)
    spend_nusd = 0
    for i, (client, adm) in enumerate(admitted):
        if i % 3 == 0:
            client.release(adm)  # failed, or its client left
            continue
        completion = rng.randint(0, 100_000)
        spend_nusd += PRICE.cost_nusd(5, 0, completion)
        client.settle(adm, 5, 0, completion)
    for client in ingresses:
        await client.drain()
    ledger = await quotas.ledger(tenant_id)
    assert ledger.meta.spent_nusd == spend_nusd <= NUSD_PER_USD
    assert (ledger.reserved_nusd, ledger.in_use) == (0, 0)


async def test_a_tiny_budget_admits_nothing_and_an_unpriced_model_is_refused(
        quotas: Quotas, ingresses: list[QuotaClient]) -> None:
    tenant_id = await quotas.tenant(TenantLimits(budget_nusd=1))
    admitted, refused = await _admit_all(ingresses, tenant_id, attempts=50, concurrency=50)
    assert not admitted and refused == {"BudgetExhausted": 50}
    with pytest.raises(BudgetExhausted) as caught:
        await ingresses[0].admit(tenant_id, "r-1", MODEL, 5, 10)
    assert msgspec.json.decode(caught.value.payload())["error"]["code"] == "insufficient_quota"
    with pytest.raises(ModelNotPriced):
        await ingresses[1].admit(tenant_id, "r-2", "unpriced-model", 0, 0)
    assert (await quotas.ledger(tenant_id)).charges == {}


async def test_an_unreachable_owner_fails_closed_in_bounded_time(quotas: Quotas) -> None:
    # Three shards configured, two running: tenants of shard 2 have no owner.
    cfg = msgspec.structs.replace(quotas.cfg.quota, shards=3)
    tenant_id = next(t for t in (f"t-{i}" for i in range(100)) if shard_of(t, 3) == 2)
    async with nats_client(quotas.cfg.nats.url) as nc:
        client = QuotaClient(nc, cfg)
        try:
            started_s = time.monotonic()
            # Eight at once: those waiting on the first one's lease ask fail with
            # it, rather than each asking in turn (eight timeouts for the last).
            failures = await asyncio.gather(*(client.admit(tenant_id, f"r-{i}", MODEL, 5, 10)
                                              for i in range(8)), return_exceptions=True)
            assert time.monotonic() - started_s < cfg.call_timeout_s + 0.2
            for failure in failures:
                assert isinstance(failure, QuotaUnavailable)
                assert (failure.status, failure.retry_after_s) == (503, cfg.retry_after_s)
        finally:
            await client.aclose()


async def test_a_shard_without_its_redis_fails_closed(quotas: Quotas) -> None:
    # Shard 2 of 3, in this process, with its Redis gone.
    cfg = msgspec.structs.replace(
        quotas.cfg, quota=msgspec.structs.replace(quotas.cfg.quota, shards=3),
        redis=RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.1))
    tenant_id = next(t for t in (f"t-{i}" for i in range(100)) if shard_of(t, 3) == 2)
    shard = QuotaService(cfg, 2)
    async with nats_client(quotas.cfg.nats.url) as nc:
        await shard.start()
        client = QuotaClient(nc, cfg.quota)
        try:
            started_s = time.monotonic()
            with pytest.raises(QuotaUnavailable):
                await client.admit(tenant_id, "r-1", MODEL, 5, 10)
            # The shard says so at once, rather than have the call resent until its bound.
            assert time.monotonic() - started_s < cfg.quota.call_timeout_s
            assert shard.stats()["store_up"] == 0 and shard.stats()["unavailable"] == 1
        finally:
            await client.aclose()
            await shard.aclose()


async def test_a_shard_killed_under_load_resets_nothing(
        quotas: Quotas, ingresses: list[QuotaClient]) -> None:
    limit = 250
    tenant_id = await quotas.tenant(TenantLimits(requests_per_minute=limit,
                                                 budget_nusd=NUSD_PER_USD))
    owner = quotas.owner(tenant_id)
    pid = await owner.__ray_call__.remote(lambda self: os.getpid())
    outcomes: collections.Counter[str] = collections.Counter()
    spend_nusd = 0
    committed: list[Admission] = []

    async def one(client: QuotaClient) -> None:
        nonlocal spend_nusd
        try:
            adm = await client.admit(tenant_id, uuid.uuid4().hex, MODEL, 5, 20)
        except (RateLimited, QuotaUnavailable) as exc:
            outcomes[type(exc).__name__] += 1
            return
        outcomes["admitted"] += 1
        spend_nusd += PRICE.cost_nusd(5, 0, 7)
        client.settle(adm, 5, 0, 7)
        committed.append(adm)

    async def load(attempts: int) -> None:
        for i in range(attempts):
            await asyncio.gather(*(one(ingresses[j % 2]) for j in range(4)))
            await asyncio.sleep(0.01 if i % 2 else 0.0)

    await load(25)  # 100 attempts, all admitted
    assert outcomes["admitted"] == 100, outcomes
    os.kill(pid, signal.SIGKILL)
    killed_s = time.monotonic()
    before_restart = outcomes["QuotaUnavailable"]
    back = asyncio.ensure_future(asyncio.wait_for(owner.ready.remote(), 60))
    while not back.done():
        await load(1)
        # Admissions fail fast while the breaker is open: pace them, or this
        # loop takes a core from the Ray restart it waits for.
        await asyncio.sleep(0.01)
    await back
    down_s = time.monotonic() - killed_s
    assert await owner.__ray_call__.remote(lambda self: os.getpid()) != pid
    await load(100)  # 400 attempts more: a shard that forgot would admit 250 of them
    for client in ingresses:
        await client.aclose()
    assert outcomes["QuotaUnavailable"] > before_restart, "the kill went unnoticed"
    assert outcomes["admitted"] <= limit, outcomes
    ledger = await quotas.ledger(tenant_id)
    assert ledger.window_requests <= limit
    # No committed spend lost, none counted twice, even when resent after the restart.
    assert ledger.meta.spent_nusd == spend_nusd, (ledger.meta.spent_nusd, spend_nusd, down_s)
    reserved = next(a for a in committed if a.lease is None)
    async with nats_client(quotas.cfg.nats.url) as nc:
        await nc.request(quota_subject(shard_of(tenant_id, SHARDS)), encode(QuotaCommit(
            tenant_id=tenant_id, request_id=reserved.request_id, model=MODEL,
            prompt_tokens=5, completion_tokens=7)), timeout=5)
    assert (await quotas.ledger(tenant_id)).meta.spent_nusd == spend_nusd


async def test_requests_running_when_a_lease_ends_become_reservations(quotas: Quotas) -> None:
    tenant_id = await quotas.tenant(TenantLimits(requests_per_minute=1_000,
                                                 budget_nusd=NUSD_PER_USD))
    # Returned 0.1 s after its expiry if requests are still running then.
    cfg = msgspec.structs.replace(quotas.cfg.quota, lease=msgspec.structs.replace(
        quotas.cfg.quota.lease, return_grace_s=0.2))
    async with nats_client(quotas.cfg.nats.url) as nc:
        client = QuotaClient(nc, cfg)
        await client.start()
        try:
            running = await client.admit(tenant_id, "r-running", MODEL, 5, 10)
            done = await client.admit(tenant_id, "r-done", MODEL, 5, 10)
            assert running.lease is not None and done.lease is running.lease
            client.settle(done, 5, 0, 4)

            async def returned() -> bool:
                return (await quotas.ledger(tenant_id)).in_use == 1

            await wait_until(returned, timeout_s=10)
            ledger = await quotas.ledger(tenant_id)
            assert ledger.charges["r-running"].open and ledger.window_requests == 2
            client.settle(running, 5, 0, 9)
            await client.drain()
        finally:
            await client.aclose()
    ledger = await quotas.ledger(tenant_id)
    assert (ledger.in_use, ledger.reserved_nusd) == (0, 0)
    assert ledger.meta.spent_nusd == PRICE.cost_nusd(5, 0, 4) + PRICE.cost_nusd(5, 0, 9)


async def test_a_resent_reserve_counts_its_request_once(quotas: Quotas) -> None:
    cfg = msgspec.structs.replace(quotas.cfg, quota=msgspec.structs.replace(
        quotas.cfg.quota, shards=3))
    shard = QuotaService(cfg, 2)
    async with nats_client(quotas.cfg.nats.url) as nc:
        await shard.start()
        try:
            tenant_id = await quotas.tenant(TenantLimits(requests_per_minute=1_000))
            while shard_of(tenant_id, 3) != 2:
                tenant_id = await quotas.tenant(TenantLimits(requests_per_minute=1_000))

            async def reserve(lease_id: str) -> QuotaReply:
                msg = await nc.request(quota_subject(2), encode(QuotaReserve(
                    tenant_id=tenant_id, request_id="r-1", model=MODEL, prompt_tokens=5,
                    max_tokens=10, lease_id=lease_id)), timeout=5)
                return quota_reply_decoder.decode(msg.data)

            # The first answer was lost (no lease asked, say, as near a limit);
            # the resend asks for a lease: the request stays its own reservation.
            assert (await reserve("")).verdict.admitted
            again = await reserve("lease-1")
            assert again.lease is None and again.verdict.admitted
        finally:
            await shard.aclose()
    assert (await quotas.ledger(tenant_id)).window_requests == 1
