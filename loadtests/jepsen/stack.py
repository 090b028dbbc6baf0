"""The whole stack of a T31 run, every part a process (or Ray actor) the
fault schedule can hit: nats-server, redis-server (append-only file, as
`switchyard up` runs it), simulated replicas one process each with their
agents, a scheduler actor, quota shard actors, the metering service as its
own process (its store failing ambiguously now and then), and two ingress
processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import msgspec

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import ReplicaRegistry, connect_redis
from deploy.procs import (
    LOOPBACK,
    ChildProcess,
    child_env,
    free_port,
    python_module,
    start_nats,
    start_redis,
)
from deploy.replica_fleet import healthy
from deploy.stack_actors import ACTOR_READY_TIMEOUT_S
from loadtests.jepsen.traffic import MODEL, TenantKey
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
from scheduler.control import SYSTEM
from scheduler.quota_terms import QuotaConfig
from scheduler.tenancy import Price, TenantLimits
from scheduler.wire import ReplicaInfo, encode

READY_TIMEOUT_S = 60.0
INGRESSES = 2
# nUSD per prompt, cached prompt and output token.
PRICE_NUSD = (100, 50, 1_000)
# name -> (limits, weight in the traffic mix).
TENANTS: dict[str, tuple[TenantLimits, int]] = {
    "free-a": (TenantLimits(), 4),
    "free-b": (TenantLimits(), 3),
    "rpm": (TenantLimits(requests_per_minute=40), 2),
    "concurrency": (TenantLimits(max_concurrent_requests=1), 2),
    # About 150 whole requests' worth: spent within the first minute or two.
    "budget": (TenantLimits(budget_nusd=150 * (60 * 100 + 40 * 1_000)), 2),
}


class Stack:
    def __init__(self, work: Path, replicas: int, ambiguous_ratio: float, seed: int) -> None:
        self.work = work
        self.logs = work / "logs"
        self.truth_path = work / "truth.jsonl"
        self.replicas = replicas
        self.ambiguous_ratio = ambiguous_ratio
        self.seed = seed
        self.cfg: Config | None = None
        self.config_path = work / "config.json"
        self.nats: ChildProcess | None = None
        self.redis: ChildProcess | None = None
        self.replica_procs: dict[int, ChildProcess] = {}
        self.replica_ports: dict[int, int] = {}
        self.metering: ChildProcess | None = None
        self.ingresses: list[ChildProcess] = []
        self.urls: list[str] = []
        self.actors: list[object] = []
        self.tenants: list[TenantKey] = []
        self._restarts = 0

    @property
    def config(self) -> Config:
        assert self.cfg is not None, "Stack.start() not awaited"
        return self.cfg

    async def start(self) -> None:
        self.nats, nats_url = await start_nats(self.work / "nats", self.logs)
        self.redis, redis_url = await start_redis(self.work / "redis", self.logs)
        run = uuid.uuid4().hex[:6]
        self.cfg = Config(
            var_dir=str(self.work), ingress=IngressConfig(port=free_port()),
            nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url),
            auth=AuthConfig(key_secret="jepsen-" + uuid.uuid4().hex),
            metering=MeteringConfig(fetch_wait_s=0.1, ack_wait_s=5.0, clickhouse=ClickHouseConfig(
                path=str(self.work / "chdb"))),
            simulator=SimulatorConfig(replicas=self.replicas, model=MODEL,
                                      decode_ms_per_token=10.0),
            quota=QuotaConfig(shards=2, call_timeout_s=1.0))
        self.config_path.write_bytes(dump_config(self.cfg))
        await self._control()
        await self._start_replicas(run)
        await self._start_actors(run)
        await self.start_metering()
        await self._start_ingresses()

    async def _control(self) -> None:
        redis = connect_redis(self.config.redis)
        try:
            plane = ControlPlane(redis, self.config.auth, None)
            # A price may not start in the past: from the next second on.
            from_s = int(time.time()) + 1
            await plane.set_price(SYSTEM, "req-jepsen-price", MODEL, Price(
                effective_from_s=from_s, input_nusd_per_token=PRICE_NUSD[0],
                cached_input_nusd_per_token=PRICE_NUSD[1], output_nusd_per_token=PRICE_NUSD[2]))
            for name, (limits, weight) in TENANTS.items():
                tenant, key = await tenant_with_key(plane, name)
                await plane.update_tenant(SYSTEM, "req-" + uuid.uuid4().hex, tenant.tenant_id,
                                          limits=limits)
                self.tenants.append(TenantKey(tenant.tenant_id, key.plaintext, weight))
        finally:
            await redis.aclose()
        await asyncio.sleep(max(0.0, from_s + 0.1 - time.time()))

    async def _start_replicas(self, run: str) -> None:
        from actors.ray_shells import ReplicaAgentActor

        redis = connect_redis(self.config.redis)
        try:
            registry = ReplicaRegistry(redis)
            for index in range(self.replicas):
                port = free_port()
                self.replica_ports[index] = port
                info = ReplicaInfo(id=self.replica_id(index), url=f"http://{LOOPBACK}:{port}",
                                   models=(MODEL,))
                await self.start_replica(index)
                agent = ReplicaAgentActor.options(name=f"jepsen-{run}-agent-{index}").remote(
                    dump_config(self.config), encode(info))
                self.actors.append(agent)
                await registry.put_replica(info)
        finally:
            await redis.aclose()

    @staticmethod
    def replica_id(index: int) -> str:
        return f"sim-{index}"

    async def start_replica(self, index: int) -> None:
        """Starts (or restarts, on its port) replica `index`."""
        port = self.replica_ports[index]
        proc = ChildProcess(f"replica {index}", python_module(
            "loadtests.jepsen.replica", str(self.config_path), str(port), self.replica_id(index),
            str(self.truth_path)), self.logs / f"replica-{index}.log", env=child_env())
        self.replica_procs[index] = proc
        await proc.start()
        async with aiohttp.ClientSession() as http:
            await proc.wait_ready(lambda: healthy(http, f"http://{LOOPBACK}:{port}/health"),
                                  READY_TIMEOUT_S)

    async def _start_actors(self, run: str) -> None:
        from actors.ray_shells import QuotaShardActor, SchedulerActor

        config_json = dump_config(self.config)
        name = f"jepsen-{run}-scheduler"
        actors = [SchedulerActor.options(name=name).remote(config_json, name, 0)]
        actors += [QuotaShardActor.options(name=f"jepsen-{run}-quota-{i}").remote(config_json, i)
                   for i in range(self.config.quota.shards)]
        self.actors += actors
        await asyncio.gather(*(asyncio.wait_for(a.ready.remote(), ACTOR_READY_TIMEOUT_S)
                               for a in actors))

    async def start_metering(self) -> None:
        log_path = self.logs / "metering.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self._restarts += 1
        proc = ChildProcess("metering", python_module(
            "loadtests.jepsen.metering", str(self.config_path), str(self.ambiguous_ratio),
            str(self.seed * 1000 + self._restarts)), log_path, env=child_env())
        self.metering = proc

        async def ready() -> bool:
            return "metering ready" in log_path.read_text(errors="replace")[offset:]

        await proc.start()
        await proc.wait_ready(ready, READY_TIMEOUT_S)

    async def _start_ingresses(self) -> None:
        for i in range(INGRESSES):
            cfg = msgspec.structs.replace(self.config, ingress=msgspec.structs.replace(
                self.config.ingress, port=free_port()))
            path = self.work / f"ingress-{i}.json"
            path.write_bytes(dump_config(cfg))
            proc = ChildProcess(f"ingress {i}", python_module("router", "--config", str(path)),
                                self.logs / f"ingress-{i}.log", env=child_env())
            self.ingresses.append(proc)
            await proc.start()
            url = f"http://{LOOPBACK}:{cfg.ingress.port}"
            async with aiohttp.ClientSession() as http:
                await proc.wait_ready(lambda u=url: healthy(http, u + "/readyz"), READY_TIMEOUT_S)
            self.urls.append(url + "/v1")

    async def restart_redis(self, down_s: float) -> None:
        """Stopped (its append-only file flushed), then started again on its
        port and directory after `down_s`."""
        assert self.redis is not None
        port = int(self.config.redis.url.rsplit(":", 1)[1].split("/")[0])
        await self.redis.stop()
        await asyncio.sleep(down_s)
        self.redis, _ = await start_redis(self.work / "redis", self.logs, port=port)

    async def kill(self, proc: ChildProcess) -> None:
        assert proc.proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.proc.send_signal(signal.SIGKILL)
        await proc.proc.wait()

    async def stop(self) -> None:
        for proc in self.ingresses:
            await proc.stop()
        for actor in self.actors:
            with contextlib.suppress(Exception):  # stopping anyway
                await asyncio.wait_for(actor.stop.remote(), timeout=10)  # type: ignore[attr-defined]
        for proc in [*self.replica_procs.values(), self.metering, self.redis, self.nats]:
            if proc is not None:
                await proc.stop()


async def wait_for(check: object, timeout_s: float, what: str) -> float:
    """Polls the async `check` until true; the seconds it took. Raises
    TimeoutError naming `what`."""
    started_s = time.monotonic()
    while not await check():  # type: ignore[operator]
        if time.monotonic() - started_s > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started_s
