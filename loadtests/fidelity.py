"""How closely the simulator follows real vLLM: the same request mix on both.

1. Starts one real vLLM replica (the tiny model, `make vllm`) and measures the
   mix: prompts of 32..900 tokens with 0/50/100 % of them already cached,
   at concurrency 1, 8 and 32; streamed completions of OUTPUT_TOKENS tokens.
2. Calibrates the simulator from that run: prefill rate and fixed cost from
   TTFT at concurrency 1, per-token decode time from the inter-token latency
   at concurrency 1, the cost of each further sequence in a batch from the
   cached cases at concurrency 8 and 32; then runs the concurrency-1 cases on
   the simulator and corrects for what the simulator itself adds (HTTP,
   asyncio), so the two agree end to end (see `calibrate`).
3. Runs the same mix on a simulated replica configured with those numbers
   and prints TTFT and decode rates side by side (JSON, then a table).

Times are the replicas' own: the change in their /metrics histograms
(vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds) over
each case, which the simulator exports with vLLM's meaning.

    python -m loadtests.fidelity [--quick]

To calibrate for another GPU or model, run steps 1-2 against a replica of it
(`--url`), then put the printed `calibrated` numbers into the [simulator]
table of the config (decode_ms_per_token, batch_ms_per_seq,
prefill_tokens_per_s, request_overhead_ms; block_size_tokens and cache_blocks as the replica's
`vllm:cache_config_info` says).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import msgspec

from deploy.procs import free_port
from deploy.vllm import SERVED_MODEL, VllmReplica, VllmReplicaSpec
from loadtests.simulator.fleet import start_fleet
from scheduler.config import SimulatorConfig

PROMPT_TOKENS = (32, 128, 512, 900)
CACHED_FRACTIONS = (0.0, 0.5, 1.0)
CONCURRENCY = (1, 8, 32)
OUTPUT_TOKENS = 32
BLOCK_SIZE = 32
KV_BLOCKS = 1024  # 32 prompts of 900 tokens fit: no preemption muddles the timing
MAX_NUM_SEQS = 128
MAX_NUM_BATCHED_TOKENS = 2048
FIRST_TOKEN_ID = 8  # below are the special tokens
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
ENGINE_SERIES = (TTFT + "_sum", TTFT + "_count", ITL + "_sum", ITL + "_count")
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class Case:
    prompt_tokens: int
    cached_fraction: float
    concurrency: int


@dataclass(frozen=True)
class Measured:
    ttft_ms: float  # mean over the case's requests, as the replica measured it
    decode_tokens_per_s: float  # 1 / mean inter-token latency


@dataclass(frozen=True)
class Calibration:
    """The simulator's timing knobs (SimulatorConfig fields)."""

    decode_ms_per_token: float
    batch_ms_per_seq: float
    prefill_tokens_per_s: float
    request_overhead_ms: float


def _ids(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, VOCAB_SIZE) for _ in range(count)]


async def _stream(session: aiohttp.ClientSession, url: str, prompt: list[int]) -> None:
    body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": OUTPUT_TOKENS,
            "min_tokens": OUTPUT_TOKENS, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for _ in resp.content:
            pass


async def _engine_totals(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Sums and counts of the replica's own TTFT and inter-token histograms."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    totals = dict.fromkeys(ENGINE_SERIES, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


async def run_case(session: aiohttp.ClientSession, url: str, case: Case,
                   rng: random.Random) -> Measured:
    """Times as the replica's engine measures them (its /metrics histograms):
    on CPU, vLLM's API server often delivers a whole stream at once, so times
    seen by the client say little about the engine being imitated."""
    cached = int(case.prompt_tokens * case.cached_fraction)
    prefix = _ids(rng, cached)
    if cached:  # warm the shared prefix first
        await _stream(session, url, prefix)
    prompts = [prefix + _ids(rng, case.prompt_tokens - cached) for _ in range(case.concurrency)]
    before = await _engine_totals(session, url)
    await asyncio.gather(*(_stream(session, url, p) for p in prompts))
    after = await _engine_totals(session, url)
    delta = {name: after[name] - before[name] for name in ENGINE_SERIES}
    ttft_ms = 1000 * delta[TTFT + "_sum"] / max(delta[TTFT + "_count"], 1)
    itl_ms = 1000 * delta[ITL + "_sum"] / max(delta[ITL + "_count"], 1)
    return Measured(ttft_ms, 1000 / itl_ms if itl_ms else 0.0)


async def run_mix(url: str, cases: list[Case], seed: int, rounds: int) -> dict[Case, Measured]:
    """Medians over `rounds` passes of the mix, after one warm-up pass (the
    first batch of a new shape costs vLLM extra on CPU)."""
    rng = random.Random(seed)  # the same seed gives both backends the same token ids
    timeout = aiohttp.ClientTimeout(total=600)
    passes: list[dict[Case, Measured]] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(rounds + 1):
            passes.append({case: await run_case(session, url, case, rng) for case in cases})
    return {case: Measured(statistics.median(p[case].ttft_ms for p in passes[1:]),
                           statistics.median(p[case].decode_tokens_per_s for p in passes[1:]))
            for case in cases}


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x; returns (a, b)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x if var_x else 0.0
    return mean_y - slope * mean_x, slope


@dataclass(frozen=True)
class Timing:
    """What a mix says about a replica: TTFT = intercept + slope x uncached
    tokens at concurrency 1; the inter-token latency alone and its growth
    per extra sequence in a batch."""

    ttft_intercept_ms: float
    ttft_ms_per_token: float
    itl_ms: float
    itl_ms_per_extra_seq: float


def timing_of(measured: dict[Case, Measured]) -> Timing:
    solo = {c: m for c, m in measured.items() if c.concurrency == 1}
    itl_ms = statistics.median(1000 / m.decode_tokens_per_s for m in solo.values())
    intercept, slope = _fit_line([(c.prompt_tokens * (1 - c.cached_fraction), m.ttft_ms)
                                  for c, m in solo.items()])
    # The cached cases prefill almost nothing: their decode pace is the batch's.
    batched = [(c.concurrency - 1, 1000 / m.decode_tokens_per_s - itl_ms)
               for c, m in measured.items() if c.cached_fraction == 1.0 and c.concurrency > 1]
    per_seq = (statistics.median(y / x for x, y in batched) if batched else 0.0)
    return Timing(intercept, slope, itl_ms, max(per_seq, 0.0))


def calibrate(real: Timing, probe: Timing, used: Calibration) -> Calibration:
    """Corrects the first guess `used` by what the simulator itself adds
    (HTTP, asyncio, detokenizing), seen when it ran with `used` (`probe`)."""
    decode_ms = max(used.decode_ms_per_token - (probe.itl_ms - real.itl_ms), 0.0)
    prefill_scale = probe.ttft_ms_per_token / real.ttft_ms_per_token
    shifted_intercept = probe.ttft_intercept_ms + (decode_ms - used.decode_ms_per_token)
    overhead_ms = max(used.request_overhead_ms + real.ttft_intercept_ms - shifted_intercept, 0.0)
    return Calibration(decode_ms_per_token=round(decode_ms, 3),
                       batch_ms_per_seq=round(real.itl_ms_per_extra_seq, 4),
                       prefill_tokens_per_s=round(used.prefill_tokens_per_s * prefill_scale, 1),
                       request_overhead_ms=round(overhead_ms, 3))


def first_guess(real: Timing) -> Calibration:
    return Calibration(decode_ms_per_token=real.itl_ms,
                       batch_ms_per_seq=real.itl_ms_per_extra_seq,
                       prefill_tokens_per_s=1000 / max(real.ttft_ms_per_token, 1e-6),
                       request_overhead_ms=0.0)


def _cases(quick: bool) -> list[Case]:
    concurrency = CONCURRENCY[:2] if quick else CONCURRENCY
    return [Case(p, f, c) for c in concurrency for p in PROMPT_TOKENS for f in CACHED_FRACTIONS]


async def measure_vllm(cases: list[Case], seed: int, rounds: int,
                       url: str) -> dict[Case, Measured]:
    if url:
        return await run_mix(url, cases, seed, rounds)
    with tempfile.TemporaryDirectory(prefix="switchyard-fidelity-") as tmp:
        spec = VllmReplicaSpec(port=free_port(), cpu_core=0, work_dir=Path(tmp),
                               kv_blocks=KV_BLOCKS, max_num_seqs=MAX_NUM_SEQS,
                               max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)
        replica = VllmReplica(spec, Path(tmp) / "vllm.log")
        await replica.start()
        try:
            return await run_mix(spec.url, cases, seed, rounds)
        finally:
            await replica.stop()


async def measure_simulator(cases: list[Case], seed: int, rounds: int,
                            cal: Calibration) -> dict[Case, Measured]:
    cfg = msgspec.structs.replace(
        SimulatorConfig(replicas=1, block_size_tokens=BLOCK_SIZE, cache_blocks=KV_BLOCKS,
                        max_num_seqs=MAX_NUM_SEQS,
                        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS),
        **asdict(cal))
    fleet = await start_fleet(cfg, ports=[0])
    try:
        return await run_mix(fleet.urls[0], cases, seed, rounds)
    finally:
        await fleet.aclose()


def _report(cases: list[Case], real: dict[Case, Measured], sim: dict[Case, Measured],
            cal: Calibration) -> dict[str, object]:
    rows = [{**asdict(c), "vllm": asdict(real[c]), "simulator": asdict(sim[c]),
             "ttft_ratio": round(sim[c].ttft_ms / real[c].ttft_ms, 3),
             "decode_ratio": round(sim[c].decode_tokens_per_s / real[c].decode_tokens_per_s, 3)}
            for c in cases]
    ttft_errors = [abs(r["ttft_ratio"] - 1) for r in rows]
    return {"calibrated": asdict(cal), "cases": rows, "summary": {
        "mean_ttft_ms": {"vllm": statistics.fmean(real[c].ttft_ms for c in cases),
                         "simulator": statistics.fmean(sim[c].ttft_ms for c in cases)},
        "median_ttft_error": statistics.median(ttft_errors),
        "cases_ttft_within_25pct": sum(e <= 0.25 for e in ttft_errors),
        "cases": len(rows),
        "median_decode_error": statistics.median(abs(r["decode_ratio"] - 1) for r in rows)}}


def _print_table(report: dict[str, object]) -> None:
    print(f"{'prompt':>6} {'cached':>6} {'conc':>4} | {'TTFT ms vllm':>12} {'sim':>8} "
          f"{'ratio':>6} | {'tok/s vllm':>10} {'sim':>8} {'ratio':>6}")
    for r in report["cases"]:  # type: ignore[union-attr]
        print(f"{r['prompt_tokens']:>6} {r['cached_fraction']:>6.0%} {r['concurrency']:>4} | "
              f"{r['vllm']['ttft_ms']:>12.1f} {r['simulator']['ttft_ms']:>8.1f} "
              f"{r['ttft_ratio']:>6.2f} | {r['vllm']['decode_tokens_per_s']:>10.1f} "
              f"{r['simulator']['decode_tokens_per_s']:>8.1f} {r['decode_ratio']:>6.2f}")
    print(json.dumps(report["summary"], indent=2))


async def main_async(quick: bool, seed: int, rounds: int, url: str) -> dict[str, object]:
    cases = _cases(quick)
    real = await measure_vllm(cases, seed, rounds, url)
    real_timing = timing_of(real)
    guess = first_guess(real_timing)
    solo = [c for c in cases if c.concurrency == 1]
    probe = timing_of(await measure_simulator(solo, seed, rounds, guess))
    cal = calibrate(real_timing, probe, guess)
    sim = await measure_simulator(cases, seed, rounds, cal)
    return _report(cases, real, sim, cal)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 8 only")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="passes per backend (medians)")
    parser.add_argument("--url", default="", help="a running replica instead of starting one")
    args = parser.parse_args()
    report = asyncio.run(main_async(args.quick, args.seed, args.rounds, args.url))
    print(json.dumps(report, indent=2))
    _print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
