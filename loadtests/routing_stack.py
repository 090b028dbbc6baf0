"""The stack the routing benchmark drives, rebuilt for every run.

Once per benchmark: nats-server (with the usage stream the ingress publishes
to), redis-server, and a Ray head (started by the caller before its loop).
Per run (one policy on one workload): a fresh fleet (cold caches), each
replica with its agent (Ray actor: load snapshots, KV-event relay), a
scheduler actor running the policy's profile, and an ingress process. No
metering actor: usage events wait in the stream, as they would while it
restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import msgspec
import nats
from nats.js.api import StreamConfig

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import ReplicaRegistry, connect_redis
from deploy.procs import LOOPBACK, ChildProcess, free_port, python_module, start_nats, start_redis
from deploy.replica_fleet import ReplicaFleet, healthy
from deploy.stack import price_unpriced
from deploy.stack_actors import ACTOR_READY_TIMEOUT_S, StackActors
from deploy.vllm import KvEventsTarget, VllmReplica, VllmReplicaSpec
from scheduler.config import (
    Config,
    IngressConfig,
    NatsConfig,
    RedisConfig,
    dump_config,
    model_config,
)
from scheduler.wire import USAGE_SUBJECTS, ReplicaInfo, encode

READY_TIMEOUT_S = 60.0


class BenchServers:
    """nats-server and redis-server for the whole benchmark."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[ChildProcess] = []
        self.nats_url = ""
        self.redis_url = ""

    async def start(self, usage_stream: str) -> None:
        nats_proc, self.nats_url = await start_nats(self.work / "nats", self.work / "logs")
        self.children.append(nats_proc)
        redis_proc, self.redis_url = await start_redis(self.work / "redis", self.work / "logs",
                                                       persist=False)
        self.children.append(redis_proc)
        nc = await nats.connect(self.nats_url)
        try:
            # Bounded: nobody consumes it during a benchmark.
            await nc.jetstream().add_stream(StreamConfig(
                name=usage_stream, subjects=[USAGE_SUBJECTS], max_msgs=100_000))
        finally:
            await nc.drain()

    def configure(self, cfg: Config) -> Config:
        return msgspec.structs.replace(
            cfg, nats=NatsConfig(url=self.nats_url), redis=RedisConfig(url=self.redis_url),
            ingress=IngressConfig(port=free_port()))

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()


class VllmFleet:
    """Real vLLM replicas started one after the other (in parallel they take four
    times as long on 2 cores), each pinned to a core, its KV events going to
    its agent."""

    def __init__(self, cfg: Config, work: Path, count: int, kv_blocks: int) -> None:
        self.cfg = cfg
        self.work = work
        self.count = count
        self.kv_blocks = kv_blocks
        self.agents: list[object] = []
        self.replicas: list[VllmReplica] = []

    async def start(self) -> list[ReplicaInfo]:
        from actors.ray_shells import ReplicaAgentActor

        infos = []
        for index in range(self.count):
            port = free_port()
            info = ReplicaInfo(id=f"vllm-{index}", url=f"http://{LOOPBACK}:{port}",
                               models=(self.cfg.simulator.model,))
            topic = f"vllm-{index}"
            agent = ReplicaAgentActor.remote(dump_config(self.cfg), encode(info), kv_topic=topic)
            self.agents.append(agent)
            endpoint = await asyncio.wait_for(agent.kv_events_endpoint.remote(),
                                              ACTOR_READY_TIMEOUT_S)
            block_tokens = model_config(self.cfg, info.models[0]).block_size_tokens
            replica = VllmReplica(VllmReplicaSpec(
                port=port, cpu_core=index % 2, work_dir=self.work / f"vllm-{index}",
                kv_blocks=self.kv_blocks, block_size_tokens=block_tokens,
                kv_events=KvEventsTarget(endpoint=endpoint, topic=topic,
                                         replay_endpoint=f"tcp://{LOOPBACK}:{free_port()}")),
                self.work / "logs" / f"vllm-{index}.log")
            self.replicas.append(replica)
            await replica.start()
            infos.append(info)
        return infos

    async def stop(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):  # stopping anyway
                await asyncio.wait_for(agent.stop.remote(), timeout=10)  # type: ignore[attr-defined]
        for replica in reversed(self.replicas):
            await replica.stop()


class RunStack:
    """One run's fleet, scheduler and ingress; `vllm_replicas` > 0 uses real vLLM."""

    def __init__(self, cfg: Config, work: Path, vllm_replicas: int = 0,
                 vllm_kv_blocks: int = 0) -> None:
        self.cfg = cfg
        self.work = work
        self.fleet: ReplicaFleet | VllmFleet = (
            VllmFleet(cfg, work, vllm_replicas, vllm_kv_blocks) if vllm_replicas
            else ReplicaFleet(cfg, work, work / "logs", StackActors(cfg)))
        self.scheduler: object | None = None
        # The ingress admits every request through them (quota.shards).
        self.quota_shards: list[object] = []
        self.ingress: ChildProcess | None = None
        self.infos: list[ReplicaInfo] = []
        self.api_key = ""

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.cfg.ingress.port}/v1"

    async def start(self) -> None:
        from actors.ray_shells import QuotaShardActor, SchedulerActor

        redis = connect_redis(self.cfg.redis)
        try:
            await redis.flushdb()
            self.infos = await self.fleet.start()
            registry = ReplicaRegistry(redis)
            for info in self.infos:
                await registry.put_replica(info)
            await price_unpriced(ControlPlane(redis, self.cfg.auth, None),
                                 (m for info in self.infos for m in info.models))
            _, key = await tenant_with_key(ControlPlane(redis, self.cfg.auth, None), "bench")
            self.api_key = key.plaintext
        finally:
            await redis.aclose()
        self.scheduler = SchedulerActor.remote(dump_config(self.cfg))
        self.quota_shards = [QuotaShardActor.remote(dump_config(self.cfg), i)
                             for i in range(self.cfg.quota.shards)]
        for actor in (self.scheduler, *self.quota_shards):
            await asyncio.wait_for(actor.ready.remote(), ACTOR_READY_TIMEOUT_S)  # type: ignore[attr-defined]
        config_path = self.work / "run" / "ingress.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_bytes(dump_config(self.cfg))
        self.ingress = ChildProcess("ingress", python_module(
            "router", "--config", str(config_path)), self.work / "logs" / "ingress.log")
        await self.ingress.start()
        async with aiohttp.ClientSession() as session:
            await self.ingress.wait_ready(
                lambda: healthy(session, self.api_url.removesuffix("/v1") + "/readyz"),
                READY_TIMEOUT_S)
        await self._await_load_reports()

    async def _await_load_reports(self) -> None:
        """Until the scheduler has heard every agent a few times (healthy, capacity known)."""
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + READY_TIMEOUT_S
        while True:
            stats = await asyncio.wait_for(self.scheduler.stats.remote(), 10)  # type: ignore[attr-defined]
            if stats["replicas"] == len(self.infos) and stats["load_reports"] >= 3 * len(
                    self.infos):
                return
            if loop.time() > deadline_s:
                raise TimeoutError(f"scheduler not ready: {stats}")
            await asyncio.sleep(0.1)

    async def scheduler_stats(self) -> dict[str, int]:
        assert self.scheduler is not None
        return await asyncio.wait_for(self.scheduler.stats.remote(), 10)  # type: ignore[attr-defined]

    async def stop(self) -> None:
        import ray

        if self.ingress is not None:
            await self.ingress.stop()
        for actor in (self.scheduler, *self.quota_shards):
            if actor is not None:
                with contextlib.suppress(Exception):  # stopping anyway
                    await asyncio.wait_for(actor.stop.remote(), timeout=10)  # type: ignore[attr-defined]
        await self.fleet.stop()
        # Actors outlive stop() (their processes idle); the next run needs the memory.
        agents = (self.fleet.agents if isinstance(self.fleet, VllmFleet)
                  else list(self.fleet.actors.handles.values()))
        if isinstance(self.fleet, ReplicaFleet):
            await self.fleet.actors.aclose()
        for actor in [self.scheduler, *self.quota_shards, *agents]:
            if actor is not None:
                ray.kill(actor)
