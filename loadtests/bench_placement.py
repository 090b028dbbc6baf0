"""Placement microbenchmark: decisions/s and per-decision latency of one
SchedulerCore with 64 replicas and a 1M-block precise prefix index.

Each profile in turn places the same trace: tenants with shared system
prompts (their blocks stored on a few replicas through KV events) plus a
unique tail, a window of requests kept in flight (each completes N placements
later) and a load report every 64 decisions. Each profile runs `--repeats`
times on a fresh core; the figures are the medians over those runs (the
machine is shared, so single runs scatter). Prints JSON, then a short table.

    python -m loadtests.bench_placement [--decisions 50000] [--repeats 3] [--profiles cost]
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
from scheduler.framework import SchedRequest
from scheduler.kv_events import BlockStored
from scheduler.wire import ReplicaInfo

REPLICAS = 64
BLOCKS_PER_REPLICA = 16_384  # 64 x 16,384 = 1,048,576 index entries
TENANTS = 512
SHARED_BLOCKS = 96           # a 1,536-token system prompt at 16 tokens a block
TAIL_BLOCKS = 32
IN_FLIGHT_WINDOW = 2_048
MODEL = "bench-model"


def _core(profile: str, pending_ttl_s: float) -> SchedulerCore:
    raw = {"scheduler": {"profile": profile, "replica_capacity_blocks": BLOCKS_PER_REPLICA,
                         "plugins": {"prefix-precise": {"pending_ttl_s": pending_ttl_s}}}}
    core = SchedulerCore(decode_config(raw, {}).scheduler, random.Random(1))
    core.set_replicas([ReplicaInfo(id=f"r{i:02d}", url=f"http://10.0.0.{i}:8000",
                                   models=(MODEL,)) for i in range(REPLICAS)])
    return core


def _prefixes(rng: random.Random) -> list[list[int]]:
    return [[rng.getrandbits(64) for _ in range(SHARED_BLOCKS)] for _ in range(TENANTS)]


def _fill_index(core: SchedulerCore, prefixes: list[list[int]], rng: random.Random) -> None:
    """Each tenant prefix on 4 replicas, then random blocks up to each replica's capacity."""
    for prefix in prefixes:
        for replica in rng.sample(sorted(core.replicas), 4):
            core.apply_kv_events(replica, [_stored(prefix)])
    for replica in core.replicas:
        missing = BLOCKS_PER_REPLICA - core.state.precise.replica_blocks(replica)
        core.apply_kv_events(replica, [_stored([rng.getrandbits(64) for _ in range(missing)])])


def _stored(hashes: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[],
                       block_size=16, lora_id=None, medium="GPU", lora_name=None)


def _trace(prefixes: list[list[int]], count: int, rng: random.Random) -> list[SchedRequest]:
    trace = []
    for i in range(count):
        blocks = (*rng.choice(prefixes), *(rng.getrandbits(64) for _ in range(TAIL_BLOCKS)))
        trace.append(SchedRequest(
            request_id=f"req-{i}", tenant_id=f"t{i % TENANTS}", model=MODEL, now_s=i * 1e-4,
            prompt_tokens=len(blocks) * 16, max_tokens=256, block_hashes=blocks,
            chunk_hashes=blocks, session_id=f"s{i % 4096}"))
    return trace


def _run(core: SchedulerCore, trace: list[SchedRequest], rng: random.Random) -> dict:
    latencies_ns = []
    replica_ids = sorted(core.replicas)
    started, cpu_started_s = time.perf_counter_ns(), time.process_time()
    for i, req in enumerate(trace):
        t0 = time.perf_counter_ns()
        core.place_view(req)
        latencies_ns.append(time.perf_counter_ns() - t0)
        if i >= IN_FLIGHT_WINDOW:
            core.done(trace[i - IN_FLIGHT_WINDOW].request_id)
        if i % 64 == 0:
            core.apply_load(rng.choice(replica_ids), running=rng.randrange(64),
                            waiting=rng.randrange(8), kv_cache_usage=rng.random(), now_s=req.now_s)
    elapsed_s = (time.perf_counter_ns() - started) / 1e9
    cpu_s = time.process_time() - cpu_started_s
    latencies_ns.sort()

    def quantile_us(q: float) -> float:
        return round(latencies_ns[min(len(latencies_ns) - 1, int(q * len(latencies_ns)))] / 1e3, 1)

    # CPU time too: on a shared machine it tells the core's own cost from waiting for a core.
    return {"decisions": len(trace), "decisions_per_s": round(len(trace) / elapsed_s),
            "decisions_per_cpu_s": round(len(trace) / cpu_s),
            "p50_us": quantile_us(0.5), "p99_us": quantile_us(0.99),
            "index_sizes": core.index_sizes()}


def _median_run(profile: str, prefixes: list[list[int]], trace: list[SchedRequest],
                repeats: int, pending_ttl_s: float) -> dict:
    runs = []
    for _ in range(repeats):
        core = _core(profile, pending_ttl_s)
        _fill_index(core, prefixes, random.Random(11))
        runs.append(_run(core, trace, random.Random(13)))
    figures = ("decisions_per_s", "decisions_per_cpu_s", "p50_us", "p99_us")
    median = {key: statistics.median_low(r[key] for r in runs) for key in figures}
    return {**runs[-1], **median, "runs": [{key: r[key] for key in figures} for r in runs]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiles",
                        default="least-load,round-robin,prefix-precise,prefix-approx,cost")
    # 0 measures precise scoring from KV events alone (no entries for prompts just sent).
    parser.add_argument("--pending-ttl-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    rng = random.Random(7)
    prefixes = _prefixes(rng)
    trace = _trace(prefixes, args.decisions, rng)
    results = {profile: _median_run(profile, prefixes, trace, args.repeats, args.pending_ttl_s)
               for profile in args.profiles.split(",")}
    print(json.dumps({"replicas": REPLICAS, "index_blocks": REPLICAS * BLOCKS_PER_REPLICA,
                      "prompt_blocks": SHARED_BLOCKS + TAIL_BLOCKS, "profiles": results}))
    print(f"{'profile':<16}{'decisions/s':>12}{'per CPU s':>11}{'p50 µs':>9}{'p99 µs':>9}"
          f"   (median of {args.repeats})", file=sys.stderr)
    for name, r in results.items():
        print(f"{name:<16}{r['decisions_per_s']:>12}{r['decisions_per_cpu_s']:>11}"
              f"{r['p50_us']:>9}{r['p99_us']:>9}", file=sys.stderr)


if __name__ == "__main__":
    main()
