"""Placement under saturation, measured on the pure core (no I/O):

- what the saturation check adds to a decision: the same trace placed with
  and without `unless_saturated` (64 replicas, least-load, never saturated so
  both place everything), side by side in alternating rounds;
- fair-queue operations per second (push then pop, 1,000 queued over 100
  tenants in 3 bands);
- fairness: a tenant's burst of 900 queued before 100 other tenants' single
  requests; at which dispatch each of those singles leaves the queue (FIFO
  would serve them at 901-1000).

    python -m loadtests.bench_saturation [--decisions 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from scheduler.config import decode_config
from scheduler.core import SchedulerCore
from scheduler.fair_queue import FairQueue
from scheduler.framework import SchedRequest
from scheduler.wire import ReplicaInfo

REPLICAS = 64
IN_FLIGHT_WINDOW = 1_024
MODEL = "bench-model"


def _core() -> SchedulerCore:
    core = SchedulerCore(decode_config({}, {}).scheduler, random.Random(1))
    core.set_replicas([ReplicaInfo(id=f"r{i:02d}", url=f"http://10.0.0.{i}:8000",
                                   models=(MODEL,)) for i in range(REPLICAS)])
    return core


def _decide_us(decisions: int, gated: bool) -> tuple[float, float]:
    core = _core()
    trace = [SchedRequest(request_id=f"q{i}", tenant_id="t", model=MODEL, now_s=i * 1e-4)
             for i in range(decisions)]
    latencies_ns = []
    for i, req in enumerate(trace):
        t0 = time.perf_counter_ns()
        core.place_view(req, unless_saturated=gated)
        latencies_ns.append(time.perf_counter_ns() - t0)
        if i >= IN_FLIGHT_WINDOW:
            core.done(trace[i - IN_FLIGHT_WINDOW].request_id)
    latencies_ns.sort()
    return (latencies_ns[len(latencies_ns) // 2] / 1e3,
            latencies_ns[int(len(latencies_ns) * 0.99)] / 1e3)


def _queue_ops_per_s(ops: int) -> float:
    rng = random.Random(3)
    queue: FairQueue[int] = FairQueue(cap=1_000, tenant_cap=1_000)
    for i in range(1_000):
        queue.push(f"k{i}", f"t{i % 100}", rng.choice((-1, 0, 1)), 1e9, i)
    keys = [(f"n{i}", f"t{rng.randrange(100)}", rng.choice((-1, 0, 1))) for i in range(ops)]
    started = time.perf_counter()
    for key, tenant, priority in keys:
        queue.push(key, tenant, priority, 1e9, 0)
        queue.pop()
    return 2 * ops / (time.perf_counter() - started)


def _fairness() -> dict[str, int]:
    queue: FairQueue[None] = FairQueue(cap=10_000, tenant_cap=10_000)
    for i in range(900):
        queue.push(f"burst-{i}", "burst", 0, 1e9, None)
    for i in range(100):
        queue.push(f"single-{i}", f"t{i}", 0, 1e9, None)
    served = [entry.key for entry in iter(queue.pop, None)]
    ranks = [rank for rank, key in enumerate(served, start=1) if key.startswith("single-")]
    return {"singles_first_served_at": ranks[0], "singles_last_served_at": ranks[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rounds: dict[str, list[tuple[float, float]]] = {"ungated": [], "gated": []}
    for _ in range(args.rounds):
        rounds["ungated"].append(_decide_us(args.decisions, gated=False))
        rounds["gated"].append(_decide_us(args.decisions, gated=True))
    decide = {name: {"p50_us": round(statistics.median(r[0] for r in runs), 2),
                     "p99_us": round(statistics.median(r[1] for r in runs), 2)}
              for name, runs in rounds.items()}
    result = {"replicas": REPLICAS, "decide": decide,
              "fair_queue_ops_per_s": round(_queue_ops_per_s(200_000)),
              "fairness": _fairness()}
    print(json.dumps(result))
    print(f"{'decision':<10}{'p50 µs':>9}{'p99 µs':>9}", file=sys.stderr)
    for name, r in decide.items():
        print(f"{name:<10}{r['p50_us']:>9}{r['p99_us']:>9}", file=sys.stderr)


if __name__ == "__main__":
    main()
