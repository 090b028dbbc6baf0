"""Replica agents against simulated replicas, the real nats-server and
redis-server: load snapshots, KV-event relay with gap filling and resyncs,
cache-config refusal, health, and keeping the registry entry present."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import nats
import pytest

from actors.control_store import ReplicaRegistry, connect_redis
from actors.replica_agent import ReplicaAgent
from deploy.cli import _parser
from deploy.procs import free_port
from deploy.replicas_cli import run_replicas
from loadtests.simulator.fleet import SimFleet, start_fleet
from scheduler.config import (
    AgentConfig,
    Config,
    ModelConfig,
    NatsConfig,
    RedisConfig,
    SimulatorConfig,
)
from scheduler.errors import ConfigError
from scheduler.kv_events import BlockStored, decode_batch
from scheduler.wire import (
    REGISTRY_CHANGED_SUBJECT,
    KvEventsRelay,
    KvResync,
    LoadSnapshot,
    ReplicaInfo,
    kv_decoder,
    kv_subject,
    load_decoder,
    load_subject,
)
from tests.harness import nats_client, wait_until

pytestmark = pytest.mark.integration

MODEL = "agent-model"
TOPIC = "sim-0"
DEADLINE_S = 5.0
SIM = SimulatorConfig(replicas=1, model=MODEL, decode_ms_per_token=2.0,
                      prefill_tokens_per_s=1e6, block_size_tokens=16, cache_blocks=256,
                      kv_events_replay_endpoint="tcp://127.0.0.1:0")
AGENT = AgentConfig(scrape_interval_s=0.05, health_interval_s=0.05, http_timeout_s=0.5,
                    replay_timeout_s=0.5)
PROMPT = "Agents relay every block a replica stores, in order, with its number. " * 3
_ids = itertools.count()


@dataclass
class Rig:
    agent: ReplicaAgent
    fleet: SimFleet
    sim: SimulatorConfig
    port: int
    http: aiohttp.ClientSession
    loads: list[LoadSnapshot] = field(default_factory=list)
    kv: list[KvEventsRelay | KvResync] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def relayed(self) -> list[KvEventsRelay]:
        return [m for m in self.kv if isinstance(m, KvEventsRelay)]

    def resyncs(self) -> list[str]:
        return [m.reason for m in self.kv if isinstance(m, KvResync)]

    async def complete(self, max_tokens: int = 8, prompt: str = PROMPT) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        async with self.http.post(self.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    async def faults(self, spec: dict[str, object]) -> None:
        async with self.http.post(self.url + "/sim/faults", json=spec) as resp:
            assert resp.status == 200, await resp.text()


@contextlib.asynccontextmanager
async def rig(nats_url: str, redis_url: str, agent_cfg: AgentConfig = AGENT,
              sim: SimulatorConfig = SIM,
              models: dict[str, ModelConfig] | None = None) -> AsyncIterator[Rig]:
    """An agent (its SUB socket bound first) and one simulated replica publishing to it."""
    port = free_port()
    cfg = Config(nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url),
                 agent=agent_cfg, models=models or {})
    info = ReplicaInfo(id=f"agent-test-{next(_ids)}", url=f"http://127.0.0.1:{port}",
                       models=(MODEL,))
    agent = ReplicaAgent(cfg, info, kv_topic=TOPIC)
    loads: list[LoadSnapshot] = []
    kv: list[KvEventsRelay | KvResync] = []

    async def on_load(msg: nats.aio.msg.Msg) -> None:
        snapshot = load_decoder.decode(msg.data)
        if snapshot.replica_id == info.id:
            loads.append(snapshot)

    async def on_kv(msg: nats.aio.msg.Msg) -> None:
        kv.append(kv_decoder.decode(msg.data))

    try:
        async with (nats_client(nats_url) as nc,
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as http):
            try:
                # Subscribed before the agent starts: its first message is a resync.
                await nc.subscribe(load_subject(MODEL), cb=on_load)
                await nc.subscribe(kv_subject(MODEL, info.id), cb=on_kv)
                await nc.flush()
                await agent.start()
                sim = msgspec.structs.replace(sim, kv_events_endpoint=agent.kv_events_endpoint)
                fleet = await start_fleet(sim, ports=[port])
                the_rig = Rig(agent, fleet, sim, port, http, loads, kv)
                try:
                    yield the_rig
                finally:
                    await the_rig.fleet.aclose()
            finally:
                await agent.aclose()
    finally:
        async with connect_redis(cfg.redis) as redis:
            await ReplicaRegistry(redis).retire_replica(info.id)


async def until(check: object) -> None:
    async def holds() -> bool:
        return bool(check())  # type: ignore[operator]
    await wait_until(holds, DEADLINE_S)


def contiguous_from_zero(relayed: list[KvEventsRelay]) -> bool:
    return [m.seq for m in relayed] == list(range(len(relayed)))


async def test_load_snapshots_carry_the_replicas_numbers(nats_url: str, redis_url: str) -> None:
    sim = msgspec.structs.replace(SIM, max_num_seqs=2, decode_ms_per_token=5.0)
    async with rig(nats_url, redis_url, sim=sim) as r:
        await until(lambda: r.loads and r.loads[-1].healthy)
        first = r.loads[-1]
        assert first.cache is not None and first.cache.block_size_tokens == 16
        assert first.precise_error == "" and first.running == 0
        requests = [asyncio.create_task(r.complete(max_tokens=60)) for _ in range(4)]
        await until(lambda: any(s.running == 2 and s.waiting == 2 for s in r.loads))
        await asyncio.gather(*requests)
        await until(lambda: r.loads[-1].running == 0
                    and r.loads[-1].prefix_cache_queries_tokens > 0)
        assert r.loads[-1].prefix_cache_hits_tokens > 0  # three prompts repeated the first
        assert r.agent.stats()["scrape_errors"] == 0


async def test_kv_events_are_relayed_in_order(nats_url: str, redis_url: str) -> None:
    async with rig(nats_url, redis_url) as r:
        await until(lambda: r.agent.healthy)
        await r.complete()
        await r.complete(prompt="A different prompt fills different blocks. " * 4)
        await until(lambda: len(r.relayed()) >= 2 and r.agent.relay.stats()["queued_batches"] == 0)
        assert r.resyncs() == ["agent_start"]
        assert contiguous_from_zero(r.relayed())
        events = [e for m in r.relayed() for e in decode_batch(m.payload).events]
        assert any(isinstance(e, BlockStored) for e in events)


async def test_a_gap_is_filled_from_replay(nats_url: str, redis_url: str) -> None:
    async with rig(nats_url, redis_url) as r:
        await until(lambda: r.agent.healthy)
        await r.complete()
        await until(lambda: len(r.relayed()) >= 1)
        r.agent.relay.drop_next_batches(2)
        for n in range(3):
            await r.complete(prompt=f"Prompt number {n} stores its own blocks. " * 4)
        await until(lambda: r.agent.relay.counters["test_dropped_batches"] == 2
                    and len(r.relayed()) >= 4)
        await until(lambda: r.agent.relay.stats()["queued_batches"] == 0)
        assert contiguous_from_zero(r.relayed()), [m.seq for m in r.relayed()]
        assert sum(m.replayed for m in r.relayed()) == 2
        assert r.agent.relay.counters["gaps_filled"] == 1
        assert r.resyncs() == ["agent_start"]


async def test_a_restarted_replica_causes_a_resync(nats_url: str, redis_url: str) -> None:
    async with rig(nats_url, redis_url) as r:
        await until(lambda: r.agent.healthy)
        await r.complete()
        await r.complete(prompt="Another prompt, more batches. " * 4)
        await until(lambda: len(r.relayed()) >= 2)
        await r.fleet.aclose()
        r.fleet = await start_fleet(r.sim, ports=[r.port])
        await until(lambda: r.agent.healthy)
        await r.complete()
        await until(lambda: "restart" in r.resyncs())
        restart_at = r.kv.index(KvResync(replica_id=r.agent.replica.id, model=MODEL,
                                         reason="restart", next_seq=0))

        def relayed_after() -> list[int]:
            return [m.seq for m in r.kv[restart_at + 1:] if isinstance(m, KvEventsRelay)]
        await until(relayed_after)
        assert relayed_after()[0] == 0
        assert r.agent.relay.counters["restarts"] == 1


async def test_a_cache_config_mismatch_refuses_precise_mode(nats_url: str,
                                                           redis_url: str) -> None:
    sim = msgspec.structs.replace(SIM, block_size_tokens=32)
    async with rig(nats_url, redis_url, sim=sim) as r:
        await until(lambda: r.loads and r.loads[-1].precise_error)
        assert "block size is 32 tokens, switchyard is configured for 16 " \
            f"(models.{MODEL}.block_size_tokens)" in r.loads[-1].precise_error
        assert r.agent.stats()["precise_error"] == r.loads[-1].precise_error
        await r.complete()
        await until(lambda: r.agent.relay.counters["refused_batches"] >= 1)
        assert r.relayed() == []
        assert r.resyncs() == ["agent_start", "cache_config"]


async def test_the_models_own_cache_settings_are_checked(nats_url: str,
                                                         redis_url: str) -> None:
    sim = msgspec.structs.replace(SIM, block_size_tokens=32,
                                  prefix_caching_hash_algo="sha256_cbor")
    models = {MODEL: ModelConfig(block_size_tokens=32, prefix_caching_hash_algo="sha256_cbor")}
    async with rig(nats_url, redis_url, sim=sim, models=models) as r:
        await until(lambda: r.loads and r.loads[-1].cache is not None)
        assert r.loads[-1].precise_error == ""
        await r.complete()
        await until(lambda: r.relayed())
        assert r.resyncs() == ["agent_start"]


async def test_an_unhealthy_replica_is_reported(nats_url: str, redis_url: str) -> None:
    async with rig(nats_url, redis_url) as r:
        await until(lambda: r.loads and r.loads[-1].healthy)
        await r.faults({"slow_start_s": 5})
        await until(lambda: not r.loads[-1].healthy)
        assert r.agent.stats()["health_failures"] >= 1
        await r.faults({})
        await until(lambda: r.loads[-1].healthy)


async def test_the_agent_keeps_its_registry_entry(nats_url: str, redis_url: str) -> None:
    async with (connect_redis(RedisConfig(url=redis_url)) as redis,
                rig(nats_url, redis_url) as r):
        registry = ReplicaRegistry(redis)
        replica_id = r.agent.replica.id

        async def registered() -> bool:
            return await registry.replica(replica_id) is not None
        await wait_until(registered, DEADLINE_S)
        assert await registry.set_draining(replica_id, True)
        await until(lambda: r.loads[-1].draining)
        await registry.remove_replica(replica_id)  # lost, e.g. Redis restarted
        await wait_until(registered, DEADLINE_S)
        entry = await registry.replica(replica_id)
        assert entry is not None and entry.draining
        await registry.retire_replica(replica_id)  # an operator's removal sticks
        registrations = r.agent.counters["registrations"]
        await until(lambda: len(r.loads) >= 5)
        snapshots = len(r.loads)
        await until(lambda: len(r.loads) >= snapshots + 5)
        assert not await registered()
        assert r.agent.counters["registrations"] == registrations


async def test_replicas_cli_adds_drains_removes_and_lists(nats_url: str, redis_url: str) -> None:
    cfg = Config(nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url))
    fleet = await start_fleet(SIM, ports=[0])
    try:
        async with nats_client(nats_url) as nc:
            changes = 0

            async def on_change(msg: nats.aio.msg.Msg) -> None:
                nonlocal changes
                changes += 1

            await nc.subscribe(REGISTRY_CHANGED_SUBJECT, cb=on_change)
            await nc.flush()

            async def run(*argv: str) -> str:
                out = io.StringIO()
                assert await run_replicas(cfg, _parser().parse_args(["replicas", *argv]), out) == 0
                return out.getvalue()

            await run("add", fleet.urls[0], "--id", "cli-a")
            await run("add", "http://127.0.0.1:1", "--id", "cli-b", "--model", "other")
            listed = await run("list")
            assert f"cli-a\t{fleet.urls[0]}\t{MODEL}\tactive" in listed
            assert "cli-b\thttp://127.0.0.1:1\tother\tactive" in listed
            await run("drain", "cli-a")
            assert "cli-a\t" in (await run("list")) and "\tdraining" in (await run("list"))
            await run("remove", "cli-a")
            await run("remove", "cli-b")
            assert "cli-" not in await run("list")
            with pytest.raises(ConfigError, match="no replica"):
                await run("drain", "cli-a")
            await until(lambda: changes == 5)
            async with connect_redis(cfg.redis) as redis:
                assert await ReplicaRegistry(redis).is_removed("cli-a")
    finally:
        await fleet.aclose()
