"""The replicas of the local stack, each watched by its agent (a Ray actor:
health, /metrics, load snapshots, KV-event relay).

Simulated replicas run one process each, like vLLM servers, and publish
their KV-cache events to their agent's SUB socket. Given URLs (real vLLM)
get agents for health and load only: their KV-event settings are their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import msgspec

from deploy.procs import LOOPBACK, ChildProcess, StartFailed, python_module
from deploy.stack_actors import ActorSpec, StackActors
from scheduler.config import Config, SimulatorConfig, dump_config
from scheduler.wire import ReplicaInfo, encode

REPLICA_READY_TIMEOUT_S = 60.0
SIM_TOPIC = "sim-{index}"


def replica_id(index: int, url: str) -> str:
    return f"r{index}-{urlsplit(url).port}"


class ReplicaFleet:
    def __init__(self, cfg: Config, var: Path, logs: Path, actors: StackActors) -> None:
        self.cfg = cfg
        self.var = var
        self.logs = logs
        self.children: list[ChildProcess] = []
        self.actors = actors

    async def start(self) -> list[ReplicaInfo]:
        if self.cfg.replicas:
            return await self._given()
        return await self._simulated()

    async def _given(self) -> list[ReplicaInfo]:
        async with aiohttp.ClientSession() as session:
            infos = [await describe(session, r.id or replica_id(i, r.url), r.url.rstrip("/"))
                     for i, r in enumerate(self.cfg.replicas)]
        for info in infos:
            await self._agent(info, kv_topic=None)
        return infos

    async def _simulated(self) -> list[ReplicaInfo]:
        sim = self.cfg.simulator
        infos = []
        for index in range(sim.replicas):
            port = sim.base_port + index
            url = f"http://{LOOPBACK}:{port}"
            info = ReplicaInfo(id=replica_id(index, url), url=url, models=(sim.model,))
            topic = SIM_TOPIC.format(index=index)
            endpoint = await self._agent(info, kv_topic=topic)
            await self._start_simulator(index, msgspec.structs.replace(
                sim, replicas=1, base_port=port, kv_events_endpoint=endpoint,
                kv_events_topic=topic, kv_events_replay_endpoint=f"tcp://{LOOPBACK}:0"))
            infos.append(info)
        async with aiohttp.ClientSession() as session:
            for proc, info in zip(self.children, infos, strict=True):
                await proc.wait_ready(lambda u=info.url: healthy(session, u + "/health"),
                                      REPLICA_READY_TIMEOUT_S)
        return infos

    async def _agent(self, info: ReplicaInfo, kv_topic: str | None) -> str:
        """Starts the replica's agent (or attaches to it); returns where its KV
        events must go. An agent `up` creates again binds the port the first
        one got, so the replica's publisher reconnects to it."""
        spec = ActorSpec(f"switchyard-agent-{info.id}", f"agent of replica {info.id}",
                         "ReplicaAgentActor", (dump_config(self.cfg), encode(info)),
                         {"kv_topic": kv_topic, "kv_bind_endpoint": f"tcp://{LOOPBACK}:*"})
        (agent,) = await self.actors.ensure([spec])
        try:
            endpoint: str = await asyncio.wait_for(agent.kv_events_endpoint.remote(),
                                                   self.cfg.ray.call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported with the part's name
            raise StartFailed(f"agent of replica {info.id} failed to start: {exc}") from None
        if endpoint:
            self.actors.specs[spec.name] = dataclasses.replace(
                spec, kwargs={**spec.kwargs, "kv_bind_endpoint": endpoint})
        return endpoint

    async def _start_simulator(self, index: int, sim: SimulatorConfig) -> None:
        config_path = self.var / "run" / f"simulator-{index}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_bytes(dump_config(msgspec.structs.replace(self.cfg, simulator=sim)))
        config_path.chmod(0o600)  # it holds the key secret
        proc = ChildProcess(f"simulated replica {index}", python_module(
            "loadtests.simulator", "--config", str(config_path)),
            self.logs / f"simulator-{index}.log")
        await proc.start()
        self.children.append(proc)

    async def stop(self) -> None:
        """The replicas; their agents are the actors' to stop (StackActors)."""
        for child in reversed(self.children):
            await child.stop()


async def healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def describe(session: aiohttp.ClientSession, rid: str, url: str) -> ReplicaInfo:
    """Asks a replica which models it serves (OpenAI /v1/models), waiting for
    it to come up (a vLLM server takes a while to load)."""
    deadline = time.monotonic() + REPLICA_READY_TIMEOUT_S
    while True:
        try:
            async with session.get(url + "/v1/models",
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
                resp.raise_for_status()
                body = await resp.json()
            break
        except (aiohttp.ClientError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise StartFailed(f"replica {url} failed: GET /v1/models: {exc!r}") from None
            await asyncio.sleep(0.5)
    models = tuple(m["id"] for m in body.get("data", []))
    if not models:
        raise StartFailed(f"replica {url} serves no model")
    return ReplicaInfo(id=rid, url=url, models=models)
