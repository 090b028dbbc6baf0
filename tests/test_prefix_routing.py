"""Approximate prefix routing end to end: the ingress sends the chained
chunk hashes of each prompt (never the prompt), and a scheduler running the
`prefix-approx` profile sends a conversation back to the replica that has
its prefix. A private stack (own nats-server, Redis db 3, scheduler service
in-process, two simulated replicas), so the session's scheduler is not
involved."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
import pytest_asyncio
from aiohttp import web

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import ReplicaRegistry, connect_redis
from actors.quota import QuotaService
from actors.scheduler import SchedulerService
from deploy.procs import LOOPBACK, free_port, start_nats
from loadtests.simulator.fleet import start_fleet
from router.app import create_app
from scheduler.config import IngressConfig, NatsConfig, RedisConfig, SchedulerConfig
from scheduler.wire import USAGE_SUBJECTS, ReplicaInfo
from tests.harness import MODEL, make_config, price_models

pytestmark = pytest.mark.integration


@dataclass
class PrefixStack:
    api: str
    key: str


@pytest_asyncio.fixture(scope="module")
async def prefix_stack(session_dir: Path, redis_url: str) -> AsyncIterator[PrefixStack]:
    work = session_dir / "prefix-stack"
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    base = make_config(work, nats_url, redis_url.removesuffix("/0") + "/3")
    cfg = msgspec.structs.replace(
        base, nats=NatsConfig(url=nats_url), redis=RedisConfig(url=base.redis.url),
        ingress=IngressConfig(port=free_port()),
        scheduler=SchedulerConfig(profile="prefix-approx"))
    fleet = await start_fleet(cfg.simulator, ports=[0, 0])
    redis = connect_redis(cfg.redis)
    await redis.flushdb()
    for i, url in enumerate(fleet.urls):
        await ReplicaRegistry(redis).put_replica(ReplicaInfo(id=f"p-{i}", url=url,
                                                             models=(MODEL,)))
    await price_models(redis, [MODEL])
    _, key = await tenant_with_key(ControlPlane(redis, cfg.auth, None), "prefix")
    await redis.aclose()
    nc = await nats.connect(nats_url)  # the usage stream the ingress publishes to
    await nc.jetstream().add_stream(name=cfg.nats.usage_stream, subjects=[USAGE_SUBJECTS])
    await nc.drain()
    scheduler = SchedulerService(cfg, random.Random(5))
    await scheduler.start()
    quota = QuotaService(cfg, 0)  # the admission of every request asks it
    await quota.start()
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, cfg.ingress.port).start()
    yield PrefixStack(f"http://{LOOPBACK}:{cfg.ingress.port}/v1", key.plaintext)
    await runner.cleanup()
    await scheduler.aclose()
    await quota.aclose()
    await fleet.aclose()
    await nats_proc.stop()


async def _replica_for(session: aiohttp.ClientSession, stack: PrefixStack,
                       messages: list[dict[str, str]]) -> str:
    async with session.post(stack.api + "/chat/completions", headers={
            "Authorization": f"Bearer {stack.key}"}, json={
            "model": MODEL, "messages": messages, "max_tokens": 2}) as resp:
        assert resp.status == 200
        return resp.headers["x-switchyard-replica"]


async def test_conversations_return_to_the_replica_holding_their_prefix(
        prefix_stack: PrefixStack) -> None:
    # Five conversations: under least-load with random ties each follow-up
    # would match its first turn's replica half the time (all five: 1/32).
    system = "You are a helpful assistant for railway operations. " * 8
    async with aiohttp.ClientSession() as session:
        for n in range(5):
            first = [{"role": "system", "content": f"{n} {system}"},
                     {"role": "user", "content": f"Conversation {n}: where is train {n}?"}]
            placed = await _replica_for(session, prefix_stack, first)
            follow_up = [*first, {"role": "assistant", "content": "On track 3."},
                         {"role": "user", "content": "And after that?"}]
            assert await _replica_for(session, prefix_stack, follow_up) == placed
