"""Placement round trip over NATS: requests to scheduler actors
(SchedulerService, in this process) on a real nats-server, sequential, the
way the ingress's router/placer.py asks (which loadtests may not import):
one wildcard reply subscription, and per request a reply subject under it,
a future and one loop timer. Beside it the pure core's decision time, so
the cost of each layer shows. Each placement is followed by its completion
notice, as in service.

Starts nats-server and redis-server on free loopback ports (8 replicas in the
registry), runs each way in rounds for 1 and 2 actors, and prints JSON and a
short table (p50/p99 in microseconds, medians over rounds).

    python -m loadtests.bench_placement_nats [--rounds 5] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.control_store import ReplicaRegistry, connect_redis
from actors.scheduler import SchedulerService
from deploy.procs import start_nats, start_redis
from scheduler.config import Config, NatsConfig, RedisConfig
from scheduler.wire import (
    DONE_SUBJECT,
    PlaceDone,
    PlaceRequest,
    ReplicaInfo,
    encode,
    place_reply_decoder,
    place_subject,
)

MODEL = "bench-model"
ANSWER_TIMEOUT_S = 2.0
REPLICAS = 8
_ids = itertools.count()


def _request() -> PlaceRequest:
    return PlaceRequest(request_id=f"req-{next(_ids)}", tenant_id="t", model=MODEL,
                        prompt_tokens=200, max_tokens=100)


class _Asker:
    """Placement requests answered on one wildcard reply subscription."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        await self.nc.subscribe(self.prefix + ".*", cb=self._on_answer)

    async def _on_answer(self, msg: Msg) -> None:
        waiter = self.waiting.pop(msg.subject, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg.data)

    async def ask(self, payload: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        reply_to = f"{self.prefix}.{next(_ids)}"
        waiter = self.waiting[reply_to] = loop.create_future()
        timer = loop.call_later(ANSWER_TIMEOUT_S, _expire, waiter)
        try:
            await self.nc.publish(place_subject(MODEL), payload, reply=reply_to)
            return await waiter
        finally:
            timer.cancel()
            self.waiting.pop(reply_to, None)


def _expire(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no placement answer in time"))


async def _nats_once(asker: _Asker) -> float:
    nc, req = asker.nc, _request()
    started_ns = time.perf_counter_ns()
    place_reply_decoder.decode(await asker.ask(encode(req)))
    elapsed_ns = time.perf_counter_ns() - started_ns
    await nc.publish(DONE_SUBJECT, encode(PlaceDone(request_id=req.request_id,
                                                    replica_id="", model=MODEL)))
    return elapsed_ns / 1e3


def _core_once(service: SchedulerService) -> float:
    req = _request()
    started_ns = time.perf_counter_ns()
    service.core.place(req, time.monotonic())
    elapsed_ns = time.perf_counter_ns() - started_ns
    service.core.done(req.request_id)
    return elapsed_ns / 1e3


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(cfg: Config, actors: int, rounds: int, requests: int) -> dict[str, dict]:
    services = [SchedulerService(cfg, random.Random(i), actor_id=f"bench-{i}")
                for i in range(actors)]
    for service in services:
        await service.start()
    nc = await nats.connect(cfg.nats.url)
    asker = _Asker(nc)
    await asker.start()
    per_round: dict[str, list[tuple[float, float]]] = {"nats_round_trip": [], "core": []}
    try:
        for _ in range(requests // 10):  # warm-up
            await _nats_once(asker)
        for _ in range(rounds):
            samples = [await _nats_once(asker) for _ in range(requests)]
            per_round["nats_round_trip"].append((_quantile(samples, 0.5),
                                                 _quantile(samples, 0.99)))
            samples = [_core_once(services[0]) for _ in range(requests)]
            per_round["core"].append((_quantile(samples, 0.5), _quantile(samples, 0.99)))
    finally:
        await nc.drain()
        for service in services:
            await service.aclose()
    return {way: {"p50_us": round(statistics.median(p50 for p50, _ in rounds_), 1),
                  "p99_us": round(statistics.median(p99 for _, p99 in rounds_), 1)}
            for way, rounds_ in per_round.items()}


async def _main(rounds: int, requests: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        work = Path(tmp)
        nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
        redis_proc, redis_url = await start_redis(work / "redis", work / "logs", persist=False)
        try:
            cfg = Config(nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url))
            redis = connect_redis(cfg.redis)
            for i in range(REPLICAS):
                await ReplicaRegistry(redis).put_replica(ReplicaInfo(
                    id=f"r{i}", url=f"http://127.0.0.1:{9000 + i}", models=(MODEL,)))
            await redis.aclose()
            return {f"actors_{n}": await _measure(cfg, n, rounds, requests) for n in (1, 2)}
        finally:
            await redis_proc.stop()
            await nats_proc.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    results = uvloop.run(_main(args.rounds, args.requests))
    print(json.dumps({"replicas": REPLICAS, "rounds": args.rounds,
                      "requests_per_round": args.requests, "results": results}))
    print(f"{'actors':<8}{'what':<17}{'p50 µs':>9}{'p99 µs':>9}", file=sys.stderr)
    for actors, ways in results.items():
        for way, r in ways.items():
            print(f"{actors.removeprefix('actors_'):<8}{way:<17}{r['p50_us']:>9}{r['p99_us']:>9}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
