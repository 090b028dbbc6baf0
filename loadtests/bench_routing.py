"""Routing policies side by side: TTFT, prefix hit rate, throughput and
goodput of each scheduler profile on the same seeded traces, through the
real stack (ingress, NATS, scheduler actor, replica agents relaying KV
events, replicas), each run on a fresh fleet with cold caches.

Workloads, and the oracle whose hit rate each run is compared with, are
defined in loadtests/routing_trace.py: (A) many tenants with long shared
system prompts whose prefixes together fill 73 % of the fleet's KV cache,
(B) multi-turn chat sessions, (C) no sharing. Arrivals are open-loop
(Poisson). The simulated replicas model a GPU-like server where the prefill
of a long prompt dominates TTFT (SIM below; the output repeats it).

Figures per run: TTFT p50/p90/p99 measured by the client from sending to the
first streamed token (requests never answered count as infinite); the prefix
hit rate from the replicas' own counters (vllm:prefix_cache_hits_total /
vllm:prefix_cache_queries_total over the run); throughput (completed
requests/s) and goodput (requests/s meeting the SLO: TTFT <= 1 s and mean
inter-token latency <= 200 ms); the oracle's hit rate for the same trace.
Diagnostics: TTFT p90 of the requests sent after the first third of the run
(warm caches), and how many replicas each tenant or session was sent to.
With --runs N each figure is the median over N runs.

    python -m loadtests.bench_routing [--quick] [--workloads A,B,C]
        [--policies round-robin,...] [--replicas 4] [--runs 1] [--load 1.0] [--vllm] [--json PATH]

--vllm is the short form on 2 real vLLM replicas (CPU, tiny model): workload
A scaled to their 128-block caches, least-load vs prefix-approx vs
prefix-precise by default; each run restarts both (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import msgspec

from deploy.procs import free_port_block
from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.routing_client import Slo, prefix_counters, replay, summarise, tokenize
from loadtests.routing_stack import BenchServers, RunStack
from loadtests.routing_trace import (
    FleetShape,
    TraceRequest,
    WorkloadSpec,
    build_trace,
    oracle_hit_rate,
    tenant_count,
)
from scheduler.config import AuthConfig, Config, ModelConfig, SchedulerConfig, SimulatorConfig

POLICIES = ("round-robin", "least-load", "prefix-approx", "prefix-precise", "cost")
# Prefill at 4,000 tokens/s dominates: a 1,000-token prompt takes 0.25 s of a
# 0.53 s step of 2,048 tokens; decoding costs 20 ms a step. 640 blocks of 16
# tokens (10k tokens) per replica.
SIM = SimulatorConfig(prefill_tokens_per_s=4_000.0, decode_ms_per_token=20.0,
                      batch_ms_per_seq=0.1, cache_blocks=640, block_size_tokens=16,
                      max_num_seqs=256, max_num_batched_tokens=2_048, max_model_len=2_048)
# Rates per replica. Without cache hits a replica prefills about 3.7 A-prompts/s
# (1,040 tokens), so A at 4.5/s overloads any policy that misses and leaves a
# policy that hits at about a third of capacity. B at 1.5 sessions/s (about 9
# turns/s of 420 tokens on average) sits about at capacity without hits; C at
# 3.5/s (760 tokens) at about 70 %.
WORKLOADS = {
    "A": WorkloadSpec("A", rate_per_replica=4.5, duration_s=30.0),
    "B": WorkloadSpec("B", rate_per_replica=1.5, duration_s=30.0, answer_tokens=120),
    "C": WorkloadSpec("C", rate_per_replica=3.5, duration_s=30.0),
}
QUICK_DURATION_S = 8.0
# How long unanswered requests may run on after the last planned arrival.
DRAIN_S = 30.0
SLO = Slo(ttft_s=1.0, mean_itl_s=0.2)
# Real vLLM (CPU, tiny model): 32-token blocks, 128 per replica; prefixes of
# 500 tokens so that a prompt fits max_model_len 1024.
VLLM_KV_BLOCKS = 128
VLLM_SPEC = WorkloadSpec("A", rate_per_replica=2.0, duration_s=20.0, prefix_tokens=500)
VLLM_POLICIES = ("least-load", "prefix-approx", "prefix-precise")


def run_config(servers: BenchServers, work: Path, policy: str, replicas: int,
               vllm: bool) -> Config:
    block_tokens = 32 if vllm else SIM.block_size_tokens
    sim = msgspec.structs.replace(SIM, replicas=replicas,
                                  base_port=0 if vllm else free_port_block(replicas))
    return servers.configure(Config(
        var_dir=str(work), auth=AuthConfig(key_secret="bench-" + "0" * 32),
        scheduler=SchedulerConfig(profile=policy), simulator=sim,
        # The tokenizer lets the ingress compute the prompts' block hashes (prefix-precise).
        models={SIM.model: ModelConfig(tokenizer_dir=str(TINY_MODEL_DIR),
                                       block_size_tokens=block_tokens)}))


async def one_run(servers: BenchServers, work: Path, policy: str, trace: list[TraceRequest],
                  spec: WorkloadSpec, shape: FleetShape, oracle: list[float],
                  vllm: bool) -> dict[str, float]:
    """One policy on a fresh fleet; `oracle` caches the trace's oracle hit rate
    (computed once, from the first fleet's tokenization)."""
    cfg = run_config(servers, work, policy, shape.replicas, vllm)
    stack = RunStack(cfg, work, vllm_replicas=shape.replicas if vllm else 0,
                     vllm_kv_blocks=shape.cache_blocks)
    try:
        await stack.start()
        urls = [info.url for info in stack.infos]
        if not oracle:
            oracle.append(oracle_hit_rate(trace, await tokenize(urls[0], trace), shape))
        hits_before, queries_before = await prefix_counters(urls)
        outcomes, wall_s = await replay(stack.api_url, stack.api_key, trace,
                                        spec.duration_s + DRAIN_S, session_header=spec.name == "B")
        hits, queries = await prefix_counters(urls)
        scheduler = await stack.scheduler_stats()
    finally:
        await stack.stop()
    result = summarise(outcomes, wall_s, SLO, hits - hits_before, queries - queries_before,
                       oracle[0], warm_after_s=spec.duration_s / 3)
    result["scheduler_kv_batches"] = scheduler.get("kv_batches", 0)
    return result


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


def targets(medians: dict[str, dict[str, dict[str, float]]]) -> dict[str, object]:
    """The issue's targets, checked on whatever was run (None: not run)."""
    out: dict[str, object] = {}
    a = medians.get("A", {})
    if "prefix-precise" in a:
        precise = a["prefix-precise"]
        for other, factor in (("round-robin", 5.0), ("prefix-approx", 1.3)):
            if other in a:
                ratio = a[other]["ttft_p90_s"] / precise["ttft_p90_s"]
                out[f"A: precise p90 {factor}x below {other}"] = {
                    "ratio": ratio, "met": ratio >= factor}
        out["A: precise hit rate >= 90% of oracle"] = {
            "fraction": precise["hit_of_oracle"], "met": precise["hit_of_oracle"] >= 0.9}
    c = medians.get("C", {})
    if "least-load" in c:
        base = c["least-load"]["ttft_p90_s"]
        for policy in ("prefix-approx", "prefix-precise", "cost"):
            if policy in c:
                ratio = c[policy]["ttft_p90_s"] / base
                out[f"C: {policy} p90 within 5% of least-load"] = {
                    "ratio": ratio, "met": ratio <= 1.05}
    return out


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def print_table(medians: dict[str, dict[str, dict[str, float]]]) -> None:
    cols = [("ttft_p50_s", "p50 s", ".3f"), ("ttft_p90_s", "p90 s", ".3f"),
            ("ttft_p99_s", "p99 s", ".3f"), ("warm_ttft_p90_s", "warm p90", ".3f"),
            ("hit_rate", "hit", ".3f"),
            ("oracle_hit_rate", "oracle", ".3f"), ("hit_of_oracle", "hit/or", ".2f"),
            ("throughput_rps", "thr r/s", ".2f"), ("goodput_rps", "good r/s", ".2f"),
            ("replicas_per_group", "rep/grp", ".2f"), ("failed", "fail", ".0f"),
            ("unfinished", "unfin", ".0f")]
    print(f"\n{'wl':<3}{'policy':<16}" + "".join(f"{title:>10}" for _, title, _ in cols))
    for workload, by_policy in medians.items():
        for policy, m in by_policy.items():
            print(f"{workload:<3}{policy:<16}" + "".join(
                f"{m[name]:>10{fmt}}" for name, _, fmt in cols))


async def bench(args: argparse.Namespace) -> dict[str, object]:
    replicas = 2 if args.vllm else args.replicas
    shape = (FleetShape(replicas, VLLM_KV_BLOCKS, 32) if args.vllm
             else FleetShape(replicas, SIM.cache_blocks, SIM.block_size_tokens))
    specs = {"A": VLLM_SPEC} if args.vllm else {
        name: dataclasses.replace(spec, duration_s=QUICK_DURATION_S) if args.quick
        else spec for name, spec in WORKLOADS.items() if name in args.workloads}
    specs = {name: dataclasses.replace(spec, rate_per_replica=spec.rate_per_replica * args.load)
             for name, spec in specs.items()}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-routing-") as tmp:
        servers = BenchServers(Path(tmp))
        await servers.start(Config().nats.usage_stream)
        try:
            for name, spec in specs.items():
                trace = build_trace(spec, shape, args.seed)
                oracle: list[float] = []
                for policy in args.policies:
                    for n in range(args.runs):
                        result = await one_run(servers, Path(tmp) / f"{name}-{policy}-{n}",
                                               policy, trace, spec, shape, oracle, args.vllm)
                        runs.setdefault(name, {}).setdefault(policy, []).append(result)
                        print(f"{name} {policy} run {n}: p90 {result['ttft_p90_s']:.3f} s, "
                              f"hit {result['hit_rate']:.3f}", file=sys.stderr, flush=True)
        finally:
            await servers.stop()
    medians = {name: {policy: _median(rs) for policy, rs in by.items()}
               for name, by in runs.items()}
    return {
        "backend": "vllm" if args.vllm else "simulator", "fleet": asdict(shape),
        "simulator": None if args.vllm else msgspec.to_builtins(SIM),
        "workloads": {name: {**asdict(spec), **({"tenants": tenant_count(spec, shape)}
                                                if name == "A" else {})}
                      for name, spec in specs.items()},
        "slo": asdict(SLO), "seed": args.seed, "load": args.load, "runs_per_cell": args.runs,
        "median": medians, "targets": targets(medians), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 s per run, 2 replicas")
    parser.add_argument("--vllm", action="store_true", help="2 real vLLM replicas, workload A")
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--policies", default="")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the JSON here (Ray may print to stdout meanwhile)")
    parser.add_argument("--load", type=float, default=1.0,
                        help="multiplies every workload's arrival rate (a load sweep)")
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    args.policies = (args.policies.split(",") if args.policies
                     else list(VLLM_POLICIES if args.vllm else POLICIES))
    if args.quick:
        args.replicas = 2

    from actors.ray_runtime import init_local_ray, shutdown_ray

    init_local_ray(num_cpus=2, namespace="switchyard-bench-routing")
    try:
        result = asyncio.run(bench(args))
    finally:
        shutdown_ray()
    text = json.dumps(_finite(result), indent=2)
    if args.json is not None:
        args.json.write_text(text)
    print(text)
    print_table(result["median"])  # type: ignore[arg-type]
    for name, check in result["targets"].items():  # type: ignore[union-attr]
        print(f"{name}: {check}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
