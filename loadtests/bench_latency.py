"""Latency of one non-streaming request through switchyard vs. directly to a
simulated replica, side by side in one run.

Starts `switchyard up` (real processes: nats-server, redis-server, Ray
actors, ingress, simulator) on free loopback ports, then alternates rounds of
sequential requests to the ingress and to a replica, and prints JSON plus a
short table: p50/p99 each way and the added latency (medians over rounds).

    python -m loadtests.bench_latency [--rounds 5] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from deploy.procs import free_port

MODEL = "switchyard-tiny"
BODY = {"model": MODEL, "max_tokens": 1,
        "messages": [{"role": "user", "content": "How far is the next station?"}]}


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                 count: int) -> list[float]:
    latencies_ms = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(url, json=BODY, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}")
        latencies_ms.append((time.perf_counter() - started) * 1000)
    return latencies_ms


async def start_stack(workdir: Path,
                      replicas: int = 1) -> tuple[asyncio.subprocess.Process, str, str, str]:
    """`switchyard up` with simulated replicas: (process, ingress chat URL, the
    first replica's chat URL (the others follow on the next ports), demo key)."""
    api_port, sim_port = free_port(), free_port()
    config = workdir / "bench.toml"
    config.write_text(f"""
[ingress]
port = {api_port}
[admin]
port = {free_port()}
[nats]
url = "nats://127.0.0.1:{free_port()}"
[redis]
url = "redis://127.0.0.1:{free_port()}/0"
[simulator]
base_port = {sim_port}
replicas = {replicas}
""")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.cli", "up", "--config", str(config), cwd=workdir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=dict(os.environ))
    assert proc.stdout is not None
    while line := (await proc.stdout.readline()).decode():
        if line.startswith("switchyard is up"):
            key = re.search(r"demo key (\S+)", line).group(1)
            return (proc, f"http://127.0.0.1:{api_port}/v1/chat/completions",
                    f"http://127.0.0.1:{sim_port}/v1/chat/completions", key)
    raise RuntimeError(f"switchyard up failed (exit {await proc.wait()})")


async def bench(rounds: int, requests: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-") as tmp:
        proc, via_url, direct_url, key = await start_stack(Path(tmp))
        try:
            auth = {"Authorization": f"Bearer {key}"}
            per_round = []
            async with aiohttp.ClientSession() as session:
                await _timed(session, via_url, auth, 50)  # warm pools and caches
                await _timed(session, direct_url, {}, 50)
                for _ in range(rounds):
                    direct = await _timed(session, direct_url, {}, requests)
                    via = await _timed(session, via_url, auth, requests)
                    per_round.append({
                        "direct_p50_ms": _quantile(direct, 0.5),
                        "direct_p99_ms": _quantile(direct, 0.99),
                        "switchyard_p50_ms": _quantile(via, 0.5),
                        "switchyard_p99_ms": _quantile(via, 0.99)})
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    summary = {name: statistics.median(r[name] for r in per_round) for name in per_round[0]}
    summary["added_p50_ms"] = summary["switchyard_p50_ms"] - summary["direct_p50_ms"]
    return {"rounds": rounds, "requests_per_round": requests, "median_of_rounds": summary,
            "per_round": per_round}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(bench(args.rounds, args.requests))
    print(json.dumps(result, indent=2))
    s = result["median_of_rounds"]
    print(f"\n{'path':<12}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'direct':<12}{s['direct_p50_ms']:>10.2f}{s['direct_p99_ms']:>10.2f}")
    print(f"{'switchyard':<12}{s['switchyard_p50_ms']:>10.2f}{s['switchyard_p99_ms']:>10.2f}")
    print(f"added p50: {s['added_p50_ms']:.2f} ms (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
