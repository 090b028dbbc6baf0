"""Precise prefix routing end to end: the ingress tokenizes each prompt with
the tiny model's tokenizer and chat template and sends its vLLM block hashes;
the replica agents relay the simulated replicas' KV events to a scheduler
running the `prefix-precise` profile, which sends requests sharing a long
prefix to the replica holding it; that replica's own prefix-cache counters
show the hits. A private stack (own nats-server, Redis db 5, scheduler
service and agents in-process, two simulated replicas)."""

from __future__ import annotations

import json
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
from actors.replica_agent import ReplicaAgent
from actors.scheduler import SchedulerService
from deploy.procs import LOOPBACK, free_port, start_nats
from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.simulator.fleet import SimFleet, start_fleet
from router.app import create_app
from router.prompt_blocks import request_block_hashes
from router.prompt_tokens import load_tokenizer
from router.requests import parse_request
from scheduler.config import AgentConfig, IngressConfig, ModelConfig, SchedulerConfig
from scheduler.framework import ReplicaId
from scheduler.wire import USAGE_SUBJECTS, ReplicaInfo
from tests.harness import (
    MODEL,
    chat_replica,
    make_config,
    prefix_hits_tokens,
    price_models,
    wait_until,
)

pytestmark = pytest.mark.integration

SYSTEM = ((TINY_MODEL_DIR / "corpus.txt").read_text()[:1_500])
FOLLOW_UPS = 6


@dataclass
class PreciseStack:
    api: str
    key: str
    scheduler: SchedulerService
    agents: list[ReplicaAgent]
    fleets: list[SimFleet]
    settings: ModelConfig
    # The tenant's: the ingress hashes prompts with it, as the replicas do.
    cache_salt: str

    def url_of(self, replica_id: str) -> str:
        return next(a.replica.url for a in self.agents if a.replica.id == replica_id)


@pytest_asyncio.fixture(scope="module")
async def precise_stack(session_dir: Path, redis_url: str) -> AsyncIterator[PreciseStack]:
    work = session_dir / "precise-stack"
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    base = make_config(work, nats_url, redis_url.removesuffix("/0") + "/5")
    sim = msgspec.structs.replace(base.simulator, replicas=1,
                                  kv_events_replay_endpoint=f"tcp://{LOOPBACK}:0")
    settings = ModelConfig(tokenizer_dir=str(TINY_MODEL_DIR),
                           block_size_tokens=sim.block_size_tokens)
    cfg = msgspec.structs.replace(
        base, ingress=IngressConfig(port=free_port()), models={MODEL: settings},
        scheduler=SchedulerConfig(profile="prefix-precise"),
        agent=AgentConfig(scrape_interval_s=0.05, health_interval_s=0.05))
    redis = connect_redis(cfg.redis)
    await redis.flushdb()
    agents, fleets = [], []
    for i in range(2):
        port = free_port()
        info = ReplicaInfo(id=f"q-{i}", url=f"http://{LOOPBACK}:{port}", models=(MODEL,))
        await ReplicaRegistry(redis).put_replica(info)
        agent = ReplicaAgent(cfg, info, kv_topic="sim-0")
        await agent.start()
        agents.append(agent)
        fleets.append(await start_fleet(msgspec.structs.replace(
            sim, kv_events_endpoint=agent.kv_events_endpoint), ports=[port]))
    await price_models(redis, [MODEL])
    tenant, key = await tenant_with_key(ControlPlane(redis, cfg.auth, None), "precise")
    await redis.aclose()
    nc = await nats.connect(nats_url)  # the usage stream the ingress publishes to
    await nc.jetstream().add_stream(name=cfg.nats.usage_stream, subjects=[USAGE_SUBJECTS])
    await nc.drain()
    scheduler = SchedulerService(cfg, random.Random(11))
    await scheduler.start()
    quota = QuotaService(cfg, 0)  # the admission of every request asks it
    await quota.start()
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, cfg.ingress.port).start()

    async def agents_relaying() -> bool:
        return all(a.healthy and a.metrics.cache is not None and not a.precise_error
                   for a in agents)

    await wait_until(agents_relaying)
    yield PreciseStack(f"http://{LOOPBACK}:{cfg.ingress.port}/v1", key.plaintext, scheduler,
                       agents, fleets, settings, tenant.cache_salt)
    await runner.cleanup()
    await scheduler.aclose()
    await quota.aclose()
    for fleet in fleets:
        await fleet.aclose()
    for agent in agents:
        await agent.aclose()
    await nats_proc.stop()


def _conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _hashes(stack: PreciseStack, messages: list[dict[str, str]]) -> tuple[int, ...]:
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    hashes = request_block_hashes(load_tokenizer(str(TINY_MODEL_DIR)), stack.settings,
                                  parse_request("chat", body).body, stack.cache_salt)
    assert hashes
    return hashes


def _body(messages: list[dict[str, str]]) -> dict[str, object]:
    return {"model": MODEL, "messages": messages, "max_tokens": 2}


async def test_a_shared_long_prefix_goes_to_the_replica_holding_it(
        precise_stack: PreciseStack) -> None:
    stack = precise_stack
    core = stack.scheduler.core
    first = _conversation("Question 0: which replica holds this prefix?")
    first_hashes = _hashes(stack, first)
    # The blocks every follow-up shares with the first prompt: the system turn's.
    shared = len(_hashes(stack, [first[0]])) - 1
    assert shared >= 20
    async with aiohttp.ClientSession() as session:
        home = await chat_replica(session, stack.api, stack.key, _body(first))
        other = next(a.replica.id for a in stack.agents if a.replica.id != home)

        async def learned() -> bool:
            held = core.state.precise.longest_prefix(first_hashes, [ReplicaId(home)])
            return held.get(ReplicaId(home), 0) == len(first_hashes)

        await wait_until(learned)
        hits_before = {rid: await prefix_hits_tokens(session, stack.url_of(rid))
                       for rid in (home, other)}
        for n in range(1, FOLLOW_UPS + 1):
            async def settled() -> bool:
                return core.in_flight_count() == 0

            await wait_until(settled)
            follow_up = _conversation(f"Question {n}: and now?")
            placed = await chat_replica(session, stack.api, stack.key, _body(follow_up))
            assert placed == home, f"follow-up {n} went to {placed}"
            # Decided by the blocks the replica announced, not by a fallback.
            candidates = core.explain_last()["candidates"]  # type: ignore[index]
            assert candidates[home]["scores"]["prefix-precise"] >= shared / len(
                _hashes(stack, follow_up))
            assert candidates[other]["scores"]["prefix-precise"] == 0.0
        hits_after = {rid: await prefix_hits_tokens(session, stack.url_of(rid))
                      for rid in (home, other)}
    block = stack.settings.block_size_tokens
    assert hits_after[home] - hits_before[home] >= FOLLOW_UPS * shared * block
    assert hits_after[other] == hits_before[other]
    assert stack.scheduler.counts["kv_batches"] > 0
    assert core.index_sizes()["prefix-approx"] == 0  # no request fell back to chunk hashes
