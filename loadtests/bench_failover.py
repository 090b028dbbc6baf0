"""Failover before the first byte, side by side in one run: the same load
through switchyard with two simulated replicas, first both healthy, then
with replica 0 answering 500, then with it refusing connections.

Starts `switchyard up` (real processes, an agent per replica), sends
`--requests` non-streaming requests at `--concurrency` per scenario, and
prints JSON plus a table: requests that failed, p50/p99 latency, the share
replica 0 served, and the ingress's retries and budget refusals. The
scenarios run in turn on one stack, so replica 0 may start one still ejected
from the one before.

    python -m loadtests.bench_failover [--requests 400] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from loadtests.bench_stack import BODY, quantile, start_stack, stop_stack

SCENARIOS: dict[str, dict[str, object]] = {
    "healthy": {},
    "replica-0-answers-500": {"error_status": 500},
    "replica-0-refuses": {"refuse_connections_s": 3600.0},
}
COUNTERS = ("switchyard_upstream_retries_total",
            "switchyard_upstream_retry_budget_exhausted_total")


async def _counters(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    async with session.get(metrics_url) as resp:
        text = await resp.text()
    found = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


async def _load(session: aiohttp.ClientSession, url: str, key: str, requests: int,
                concurrency: int) -> tuple[list[float], list[str], int]:
    """(latencies of successes in ms, serving replica of each success, failures)."""
    latencies_ms: list[float] = []
    served_by: list[str] = []
    failures = 0
    todo = iter(range(requests))
    headers = {"Authorization": f"Bearer {key}"}

    async def worker() -> None:
        nonlocal failures
        for _ in todo:
            started = time.perf_counter()
            async with session.post(url, json=BODY, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    failures += 1
                    continue
                latencies_ms.append((time.perf_counter() - started) * 1000)
                served_by.append(resp.headers["x-switchyard-replica"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies_ms, served_by, failures


async def bench(requests: int, concurrency: int) -> dict[str, object]:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="switchyard-failover-") as tmp:
        stack = await start_stack(Path(tmp), replicas=2)
        via_url, direct_url, key = stack.via_url, stack.direct_url, stack.key
        api, sim = urlsplit(via_url), urlsplit(direct_url)
        metrics_url = f"http://{api.netloc}/metrics"
        faults_url = f"http://{sim.netloc}/sim/faults"
        try:
            async with aiohttp.ClientSession() as session:
                await _load(session, via_url, key, 50, concurrency)  # warm pools
                for name, faults in SCENARIOS.items():
                    if faults.get("refuse_connections_s") is None:
                        async with session.post(faults_url, json=faults) as resp:
                            resp.raise_for_status()
                    else:  # the replica stops listening: the answer may not come
                        async with session.post(faults_url, json=faults):
                            pass
                    before = await _counters(session, metrics_url)
                    latencies, served_by, failures = await _load(
                        session, via_url, key, requests, concurrency)
                    after = await _counters(session, metrics_url)
                    # `up` names replicas r<index>-<port>.
                    replica_0 = sum(1 for r in served_by if r.endswith(f"-{sim.port}"))
                    results[name] = {
                        "requests": requests, "failed": failures,
                        "p50_ms": quantile(latencies, 0.5), "p99_ms": quantile(latencies, 0.99),
                        "served_by_replica_0": replica_0,
                        "retries": after[COUNTERS[0]] - before[COUNTERS[0]],
                        "budget_refusals": after[COUNTERS[1]] - before[COUNTERS[1]]}
        finally:
            await stop_stack(stack)
    return {"concurrency": concurrency, "scenarios": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    result = asyncio.run(bench(args.requests, args.concurrency))
    print(json.dumps(result, indent=2))
    print(f"\n{'scenario':<24}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'on r0':>7}"
          f"{'retries':>9}{'refused':>9}")
    for name, r in result["scenarios"].items():
        print(f"{name:<24}{r['failed']:>8}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['served_by_replica_0']:>7}{r['retries']:>9.0f}{r['budget_refusals']:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
