"""Quota admission through the ingress's client (router/quota_client.py)
against a quota shard in a Ray actor, on real nats-server and redis-server:
admissions per second with leases (the shard asked about once per lease)
and with a call to the shard for every request (its leases turned off),
side by side, with the shard's calls per second; the latency of one shard
call (a reserve, sequential, each followed by its release) with p50/p99;
and the fast path: admit() one at a time while a lease is held, p50/p99.

Each admission is followed by its settlement (commit of its usage) as soon
as the loop turns, `--workers` of them at a time on one event loop, as one
ingress process; shard calls per admission count the settling ones too.

    python -m loadtests.bench_quota [--seconds 3] [--workers 32] [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import uvloop

from actors.control_plane import TENANT_KEY
from actors.control_store import connect_redis
from actors.ray_runtime import init_local_ray, shutdown_ray
from actors.tenancy_reader import LIMITS_FIELD, PRICES_KEY
from analytics.metering_client import MeteringClient
from deploy.procs import start_nats, start_redis
from router.quota_client import QuotaClient
from scheduler.config import (
    ClickHouseConfig,
    Config,
    MeteringConfig,
    NatsConfig,
    RedisConfig,
    dump_config,
)
from scheduler.errors import YardError
from scheduler.quota_terms import LeaseSizing, QuotaConfig
from scheduler.tenancy import Price, TenantLimits
from scheduler.wire import QuotaRelease, QuotaReserve, encode, quota_reply_decoder, quota_subject
from scheduler.wire.usage import UsageRowsQuery

MODEL = "bench-model"
PRICE = Price(effective_from_s=0, input_nusd_per_token=500, cached_input_nusd_per_token=50,
              output_nusd_per_token=1_000)
# Limits that bind nowhere in the run, but are all enforced (and leased).
LIMITS = TenantLimits(requests_per_minute=10**7, tokens_per_minute=10**10,
                      max_concurrent_requests=10**6, budget_nusd=10**15)
NO_LEASES = LeaseSizing(min_requests=10**9)


async def _tenant(cfg: Config) -> str:
    tenant_id = "t-" + uuid.uuid4().hex[:10]
    redis = connect_redis(cfg.redis)
    try:
        await redis.hset(TENANT_KEY.format(tenant_id=tenant_id),
                         LIMITS_FIELD, msgspec.json.encode(LIMITS).decode())
    finally:
        await redis.aclose()
    return tenant_id


async def _admissions(cfg: Config, seconds: float, workers: int) -> dict[str, float]:
    tenant_id = await _tenant(cfg)
    nc = await nats.connect(cfg.nats.url)
    client = QuotaClient(nc, cfg.quota)
    await client.start()
    admitted = failed = 0
    until_s = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal admitted, failed
        while time.monotonic() < until_s:
            try:
                adm = await client.admit(tenant_id, uuid.uuid4().hex, MODEL, 200, 100)
            except YardError:
                # The limits bind nowhere: only a shard too slow to answer
                # within quota.call_timeout_s (a loaded machine) fails one.
                failed += 1
                continue
            await asyncio.sleep(0)  # the request is served meanwhile
            client.settle(adm, 200, 0, 50)
            admitted += 1

    try:
        started_s = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed_s = time.monotonic() - started_s
        calls = client.counts["calls"]
        await client.aclose()
    finally:
        await nc.drain()
    return {"admissions_per_s": round(admitted / elapsed_s),
            "shard_calls_per_admission": round(calls / max(1, admitted), 4),
            # Calls the shard answered per second (reserves, commits, leases).
            "shard_ops_per_s": round(calls / elapsed_s),
            "failed": failed}


async def _fast_path(cfg: Config, admissions: int) -> dict[str, float]:
    """One admission at a time, each settled at once: the time admit() takes
    when the lease it draws on is already held (the ones that asked the
    shard for a lease are left out and counted)."""
    tenant_id = await _tenant(cfg)
    nc = await nats.connect(cfg.nats.url)
    client = QuotaClient(nc, cfg.quota)
    await client.start()
    samples_us: list[float] = []
    try:
        for _ in range(admissions):
            calls_before = client.counts["calls"]
            started_ns = time.perf_counter_ns()
            adm = await client.admit(tenant_id, uuid.uuid4().hex, MODEL, 200, 100)
            elapsed_us = (time.perf_counter_ns() - started_ns) / 1e3
            client.settle(adm, 200, 0, 50)
            if client.counts["calls"] == calls_before:
                samples_us.append(elapsed_us)
        await client.aclose()
    finally:
        await nc.drain()
    ordered = sorted(samples_us)
    return {"p50_us": round(ordered[len(ordered) // 2], 1),
            "p99_us": round(ordered[int(0.99 * len(ordered))], 1),
            "with_shard_call": admissions - len(samples_us)}


async def _call_latency(cfg: Config, calls: int) -> dict[str, float]:
    tenant_id = await _tenant(cfg)
    nc = await nats.connect(cfg.nats.url)
    samples_us: list[float] = []
    try:
        for i in range(calls + calls // 10):
            request_id = uuid.uuid4().hex
            started_ns = time.perf_counter_ns()
            msg = await nc.request(quota_subject(0), encode(QuotaReserve(
                tenant_id=tenant_id, request_id=request_id, model=MODEL, prompt_tokens=200,
                max_tokens=100)), timeout=5)
            elapsed_us = (time.perf_counter_ns() - started_ns) / 1e3
            assert quota_reply_decoder.decode(msg.data).verdict.admitted
            if i >= calls // 10:  # after the warm-up
                samples_us.append(elapsed_us)
            await nc.request(quota_subject(0), encode(QuotaRelease(
                tenant_id=tenant_id, request_id=request_id)), timeout=5)
    finally:
        await nc.drain()
    ordered = sorted(samples_us)
    return {"p50_us": round(ordered[len(ordered) // 2]),
            "p99_us": round(ordered[int(0.99 * len(ordered))])}


async def _with_shard(cfg: Config, measure: Any) -> dict[str, float]:
    from actors.ray_shells import QuotaShardActor

    shard = QuotaShardActor.remote(dump_config(cfg), 0)
    await asyncio.wait_for(shard.ready.remote(), 120)
    try:
        return await measure(cfg)
    finally:
        await asyncio.wait_for(shard.stop.remote(), 10)
        import ray

        ray.kill(shard)


@contextlib.asynccontextmanager
async def quota_bench_stack(work: Path, quota: QuotaConfig) -> AsyncIterator[Config]:
    """nats-server, redis-server (MODEL priced) and the metering service, which
    tells a shard on a new Redis what a budget tenant was billed (nothing)."""
    from actors.ray_shells import MeteringActor

    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    redis_proc, redis_url = await start_redis(work / "redis", work / "logs", persist=False)
    metering = None
    try:
        cfg = Config(nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url),
                     metering=MeteringConfig(clickhouse=ClickHouseConfig(path=str(work / "chdb"))),
                     quota=quota)
        redis = connect_redis(cfg.redis)
        await redis.hset(PRICES_KEY, MODEL, msgspec.json.encode((PRICE,)).decode())
        await redis.aclose()
        metering = MeteringActor.remote(dump_config(cfg))
        await asyncio.wait_for(metering.ready.remote(), 120)
        nc = await nats.connect(nats_url)
        try:  # its first query warms chDB up
            await MeteringClient(nc, timeout_s=60).usage_rows(UsageRowsQuery(to_ms=60_000))
        finally:
            await nc.drain()
        yield cfg
    finally:
        if metering is not None:
            await asyncio.wait_for(metering.stop.remote(), 10)
        await redis_proc.stop()
        await nats_proc.stop()


async def _main(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    async with quota_bench_stack(work, QuotaConfig(shards=1)) as base:
        no_leases = msgspec.structs.replace(base, quota=msgspec.structs.replace(
            base.quota, lease=NO_LEASES))
        rounds: dict[str, list[dict[str, float]]] = {"leases": [], "per_request": [],
                                                     "shard_call": [], "fast_path": []}
        for _ in range(args.rounds):
            for name, cfg in (("leases", base), ("per_request", no_leases)):
                rounds[name].append(await _with_shard(
                    cfg, lambda c: _admissions(c, args.seconds, args.workers)))
            rounds["shard_call"].append(await _with_shard(
                no_leases, lambda c: _call_latency(c, args.calls)))
            rounds["fast_path"].append(await _with_shard(
                base, lambda c: _fast_path(c, args.calls)))
        return {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                for name, runs in rounds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    init_local_ray(num_cpus=2, namespace="switchyard-bench-quota")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-quota-") as tmp:
            results = uvloop.run(_main(args, Path(tmp)))
    finally:
        shutdown_ray()
    print(json.dumps({"workers": args.workers, "seconds": args.seconds,
                      "rounds": args.rounds, "results": results}))
    leases, per_request, call, fast = (
        results[k] for k in ("leases", "per_request", "shard_call", "fast_path"))
    print(f"{'admission':<13}{'admissions/s':>14}{'shard calls each':>18}{'shard ops/s':>13}"
          f"{'failed':>8}", file=sys.stderr)
    for name, r in (("leases", leases), ("per request", per_request)):
        print(f"{name:<13}{r['admissions_per_s']:>14.0f}{r['shard_calls_per_admission']:>18}"
              f"{r['shard_ops_per_s']:>13.0f}{r['failed']:>8.0f}", file=sys.stderr)
    print(f"shard call (reserve): p50 {call['p50_us']:.0f} µs, p99 {call['p99_us']:.0f} µs",
          file=sys.stderr)
    print(f"fast path (lease held, one at a time): admit p50 {fast['p50_us']:.1f} µs, "
          f"p99 {fast['p99_us']:.1f} µs", file=sys.stderr)


if __name__ == "__main__":
    main()
