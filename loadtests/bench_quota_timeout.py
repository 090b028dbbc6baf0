"""How many admissions a healthy quota shard fails (QuotaUnavailable) under
load, for each `quota.call_timeout_s` given, measured alternately in the
same run: one shard in a Ray actor on real nats-server and redis-server,
`--clients` quota clients (as ingress processes, on one loop here) of
`--workers` concurrent admissions each, every admission a call to the shard
(leases off, the heaviest case), each settled as soon as the loop turns.

An admission that times out opens the shard's breaker in that client, which
fails the client's next admissions of its tenants at once for
`quota.breaker_open_s`: a bound too tight for the machine costs more than
the calls that exceed it.

    python -m loadtests.bench_quota_timeout [--timeouts 0.25,1.0] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats
import uvloop

from actors.ray_runtime import init_local_ray, shutdown_ray
from loadtests.bench_quota import MODEL, NO_LEASES, _tenant, _with_shard, quota_bench_stack
from router.quota_client import QuotaClient
from scheduler.config import Config
from scheduler.errors import QuotaUnavailable, YardError
from scheduler.quota_terms import QuotaConfig


async def _refusals(cfg: Config, seconds: float, clients: int, workers: int
                    ) -> dict[str, float]:
    tenant_id = await _tenant(cfg)
    conns = [await nats.connect(cfg.nats.url) for _ in range(clients)]
    quota = [QuotaClient(nc, cfg.quota) for nc in conns]
    for client in quota:
        await client.start()
    outcomes = {"admitted": 0, "unavailable": 0, "other": 0}
    until_s = time.monotonic() + seconds

    async def worker(client: QuotaClient) -> None:
        while time.monotonic() < until_s:
            try:
                adm = await client.admit(tenant_id, uuid.uuid4().hex, MODEL, 200, 100)
            except QuotaUnavailable:
                outcomes["unavailable"] += 1
                await asyncio.sleep(0.01)  # as a client answered 503 comes back
                continue
            except YardError:
                outcomes["other"] += 1
                continue
            await asyncio.sleep(0)  # the request is served meanwhile
            client.settle(adm, 200, 0, 50)
            outcomes["admitted"] += 1

    try:
        await asyncio.gather(*(worker(c) for c in quota for _ in range(workers)))
        for client in quota:
            await client.aclose()
    finally:
        for nc in conns:
            await nc.drain()
    attempts = sum(outcomes.values())
    # Most failures are the admissions an open breaker failed at once: the
    # time it was open is the cost, the trips are the calls that missed.
    return {**outcomes, "unavailable_pct": round(100 * outcomes["unavailable"] / attempts, 2),
            "breaker_trips": sum(c.outage.counts["away"] for c in quota),
            "breaker_open_pct": round(100 * sum(c.outage.counts["away_ms"] for c in quota)
                                      / (1000 * seconds * clients), 2)}


async def _main(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    timeouts = [float(t) for t in args.timeouts.split(",")]
    runs: dict[float, list[dict[str, float]]] = {t: [] for t in timeouts}
    async with quota_bench_stack(work, QuotaConfig(shards=1, lease=NO_LEASES)) as base:
        for _ in range(args.rounds):
            for timeout_s in timeouts:
                cfg = msgspec.structs.replace(base, quota=msgspec.structs.replace(
                    base.quota, call_timeout_s=timeout_s))
                runs[timeout_s].append(await _with_shard(cfg, lambda c: _refusals(
                    c, args.seconds, args.clients, args.workers)))
    return {str(t): {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for t, rs in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeouts", default="0.25,1.0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    init_local_ray(num_cpus=2, namespace="switchyard-bench-quota-timeout")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-quota-timeout-") as tmp:
            results = uvloop.run(_main(args, Path(tmp)))
    finally:
        shutdown_ray()
    print(json.dumps({"clients": args.clients, "workers": args.workers,
                      "seconds": args.seconds, "rounds": args.rounds, "results": results}))
    print(f"{'call_timeout_s':<16}{'admitted':>10}{'unavailable':>13}{'%':>8}{'trips':>7}"
          f"{'open %':>8}", file=sys.stderr)
    for timeout_s, r in results.items():
        print(f"{timeout_s:<16}{r['admitted']:>10.0f}{r['unavailable']:>13.0f}"
              f"{r['unavailable_pct']:>8}{r['breaker_trips']:>7.0f}{r['breaker_open_pct']:>8}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
