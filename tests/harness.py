"""An in-process switchyard for integration tests: the real nats-server and
redis-server (session fixtures), real Ray actors for the scheduler, the
quota shards and the metering (chDB), simulated replicas and the ingress app
on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
from aiohttp import web
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from actors.control_plane import PRICES_KEY, ControlPlane, tenant_with_key
from actors.control_store import ReplicaRegistry, connect_redis
from analytics.metering import MeteringService
from deploy.procs import LOOPBACK, ChildProcess, free_port, start_nats
from deploy.replica_fleet import healthy
from loadtests.simulator.fleet import SimFleet, start_fleet
from loadtests.simulator.replica import SimReplica
from router.app import create_app
from scheduler.config import (
    AuthConfig,
    ClickHouseConfig,
    Config,
    IngressConfig,
    MeteringConfig,
    NatsConfig,
    RedisConfig,
    SimulatorConfig,
    dump_config,
)
from scheduler.quota_terms import QuotaConfig
from scheduler.replica_metrics import parse_metrics
from scheduler.tenancy import Price
from scheduler.wire import ReplicaInfo

PROJECT_DIR = Path(__file__).resolve().parent.parent

MODEL = "switchyard-tiny"
# What a test stack charges for its models (USD 0.15 / 0.075 / 0.60 per
# million tokens): an unpriced model is refused for every tenant.
TEST_PRICE = Price(effective_from_s=0, input_nusd_per_token=150,
                   cached_input_nusd_per_token=75, output_nusd_per_token=600)


def make_config(session_dir: Path, nats_url: str, redis_url: str) -> Config:
    return Config(
        var_dir=str(session_dir),
        # One process per ingress (more_ingresses starts them as `python -m router`).
        ingress=IngressConfig(port=free_port(), workers=1),
        nats=NatsConfig(url=nats_url),
        redis=RedisConfig(url=redis_url),
        auth=AuthConfig(key_secret="test-secret-" + "0" * 32),
        metering=MeteringConfig(fetch_wait_s=0.1, clickhouse=ClickHouseConfig(
            path=str(session_dir / "chdb"))),
        simulator=SimulatorConfig(replicas=2, model=MODEL, decode_ms_per_token=2.0,
                                  prefill_tokens_per_s=1e6),
        # One shard actor per stack keeps the shared test machine light; the
        # quota tests that need two say so.
        quota=QuotaConfig(shards=1),
    )


async def price_models(redis: Redis, models: Iterable[str]) -> None:
    """Gives each of `models` TEST_PRICE (in effect since ever) unless it has
    a price: straight into the control store's hash, so test stacks add no
    audit entries."""
    for model in models:
        await redis.hsetnx(PRICES_KEY, model, msgspec.json.encode((TEST_PRICE,)))


@contextlib.asynccontextmanager
async def nats_client(url: str, **options: Any) -> AsyncIterator[NATS]:
    """A NATS client closed however the block ends. A test that fails with a
    client open would otherwise leave it reconnecting (to a server that may
    be stopped by then) and its warnings would fail the tests after it.
    Drained on success, so what the block published is flushed; closed at
    once on an error or when it is not connected."""
    client = await nats.connect(url, **options)
    try:
        yield client
    except BaseException:
        await client.close()
        raise
    if client.is_connected:
        await client.drain()
    else:
        await client.close()


@contextlib.asynccontextmanager
async def running_metering(cfg: Config) -> AsyncIterator[MeteringService]:
    """The metering service, started, and closed however the block ends."""
    service = MeteringService(cfg)
    await service.start()
    try:
        yield service
    finally:
        await service.aclose()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Polls `check` until it holds; fails the test with a clear message if not."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


async def chat_replica(session: aiohttp.ClientSession, api: str, key: str,
                       body: dict[str, Any]) -> str:
    """Asks for a chat completion (must succeed); returns the replica that served it."""
    async with session.post(api + "/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["x-switchyard-replica"]


async def prefix_hits_tokens(session: aiohttp.ClientSession, replica_url: str) -> int:
    """The replica's own count of prompt tokens served from its prefix cache."""
    async with session.get(replica_url + "/metrics") as resp:
        return parse_metrics(await resp.text()).prefix_cache_hits_tokens


@dataclass
class Switchyard:
    cfg: Config
    fleet: SimFleet | None  # None when routing to external replicas (real vLLM)
    api_key: str
    tenant_id: str
    actors: list[Any]
    runner: web.AppRunner
    # The scheduler actors (also in `actors`), by their actor id.
    schedulers: dict[str, Any] = field(default_factory=dict)
    # The quota shard actors (also in `actors`), by shard.
    quota_shards: list[Any] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.cfg.ingress.port}/v1"

    def replica_of(self, replica_id: str) -> SimReplica:
        assert self.fleet is not None
        return self.fleet.replicas[int(replica_id.removeprefix("sim-"))]

    async def new_tenant(self, name: str) -> tuple[str, str]:
        """A fresh tenant with one key: (tenant id, plaintext key)."""
        async with connect_redis(self.cfg.redis) as redis:
            tenant, key = await tenant_with_key(ControlPlane(redis, self.cfg.auth, None), name)
            return tenant.tenant_id, key.plaintext

    async def aclose(self) -> None:
        await self.runner.cleanup()
        for actor in self.actors:
            await asyncio.wait_for(actor.stop.remote(), timeout=10)
        if self.fleet is not None:
            await self.fleet.aclose()


async def start_switchyard(cfg: Config, replica_urls: list[str] | None = None) -> Switchyard:
    """Simulated replicas (ids `sim-<i>`) unless `replica_urls` are given
    (ids `ext-<i>`); each serves MODEL."""
    from actors.ray_shells import MeteringActor, QuotaShardActor, SchedulerActor

    fleet = None
    if replica_urls is None:
        fleet = await start_fleet(cfg.simulator, ports=[0] * cfg.simulator.replicas)
    prefix, urls = ("sim", fleet.urls) if fleet else ("ext", replica_urls or [])
    async with connect_redis(cfg.redis) as redis:
        registry = ReplicaRegistry(redis)
        for i, url in enumerate(urls):
            await registry.put_replica(ReplicaInfo(id=f"{prefix}-{i}", url=url, models=(MODEL,)))
        await price_models(redis, [MODEL])
        tenant, key = await tenant_with_key(ControlPlane(redis, cfg.auth, None), "tests")
    config_json = dump_config(cfg)
    # Named apart from other stacks' in the same Ray namespace.
    names = [f"switchyard-scheduler-{cfg.ingress.port}-{i}" for i in range(cfg.scheduler.actors)]
    schedulers = {name: SchedulerActor.options(name=name).remote(config_json, name, free_port())
                  for name in names}
    quota_shards = [QuotaShardActor.options(name=f"switchyard-quota-{cfg.ingress.port}-{i}")
                    .remote(config_json, i) for i in range(cfg.quota.shards)]
    actors = [MeteringActor.remote(config_json), *schedulers.values(), *quota_shards]
    await asyncio.gather(*(asyncio.wait_for(a.ready.remote(), 120) for a in actors))
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, cfg.ingress.port).start()
    return Switchyard(cfg, fleet, key.plaintext, tenant.tenant_id, actors, runner, schedulers,
                      quota_shards)


@contextlib.asynccontextmanager
async def private_switchyard(work: Path, redis_url: str, redis_db: int,
                             tweak: Callable[[Config], Config]) -> AsyncIterator[Switchyard]:
    """A whole stack of its own (nats-server, Redis database `redis_db`, Ray
    actors, ingress, simulated replicas) from `tweak(make_config(...))`, for
    tests that must not disturb the session's stack."""
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    try:
        cfg = tweak(make_config(work, nats_url, redis_url.removesuffix("/0") + f"/{redis_db}"))
        async with connect_redis(cfg.redis) as redis:
            await redis.flushdb()
        stack = await start_switchyard(cfg)
        try:
            yield stack
        finally:
            await stack.aclose()
    finally:
        await nats_proc.stop()


@contextlib.asynccontextmanager
async def more_ingresses(yard: Switchyard, work: Path, count: int) -> AsyncIterator[list[str]]:
    """`count` more ingress processes (`python -m router`) of the stack, each
    on its own port; yields their /v1 URLs once they are ready, stops them after."""
    children: list[ChildProcess] = []
    urls: list[str] = []
    try:
        for i in range(count):
            cfg = msgspec.structs.replace(yard.cfg, ingress=msgspec.structs.replace(
                yard.cfg.ingress, port=free_port()))
            path = work / f"ingress-{i}.json"
            path.write_bytes(dump_config(cfg))
            child = ChildProcess(f"ingress-{i}", [sys.executable, "-m", "router", "--config",
                                                  str(path)], work / "logs" / f"ingress-{i}.log",
                                 env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
            children.append(child)
            await child.start()
            urls.append(f"http://{LOOPBACK}:{cfg.ingress.port}/v1")
        async with aiohttp.ClientSession() as http:
            for child, url in zip(children, urls, strict=True):
                await child.wait_ready(
                    lambda u=url: healthy(http, u.removesuffix("/v1") + "/readyz"), 60)
        yield urls
    finally:
        for child in children:
            await child.stop()
