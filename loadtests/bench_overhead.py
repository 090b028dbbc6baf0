"""What switchyard adds to a request, measured from outside: the same load
sent directly to simulated replicas and through the stack (`switchyard up`:
ingress, NATS placement round trip to a scheduler actor, quota, usage
events), in one run, alternating, in rounds; medians over rounds.

- added latency p50/p99 at fixed open-loop rates (100, 500, 1,000 rps),
  non-streaming and streaming (time to first event and to the end);
- the most requests per second through the stack (closed loop) with 1 and
  2 ingress workers, beside the replicas' own;
- SSE chunks relayed per second per worker;
- optionally (`--profile`) a per-stage breakdown of one worker's CPU time
  per request, from py-spy samples (loadtests/stage_profile.py);
- optionally (`--floor`) the same closed loop against aiohttp alone (a bare
  server and a bare proxy, loadtests/aiohttp_floor.py): the floor under the
  ingress's CPU per request.

The simulated replicas decode in zero time, so they are not the limit. The
load generator, the replicas, NATS, Ray and the ingress share this
machine's cores: see `uptime` in the output.

    python -m loadtests.bench_overhead [--rounds 3] [--seconds 2] [--workers 1 2]
        [--profile] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import uvloop

from deploy.procs import free_port
from loadtests import stage_profile
from loadtests.bench_stack import BODY, MODEL, BenchStack, quantile, start_stack, stop_stack
from loadtests.load_gen import Client, Sample, closed_loop, new_client, open_loop

# Replicas that answer at once: decode and prefill take no simulated time.
FAST_SIMULATOR = """decode_ms_per_token = 0.0
batch_ms_per_seq = 0.0
prefill_tokens_per_s = 1e9
max_num_seqs = 1024
"""
RATES_RPS = (100, 500, 1000)
STREAM_BODY = {**BODY, "max_tokens": 16, "stream": True}
# Long streams for chunk throughput (the simulator's max_model_len is 1024).
SSE_BODY = {"model": MODEL, "max_tokens": 900, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me everything."}]}


def _uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" 1")[0].strip()


class Paths:
    """The same request sent direct (round robin over the replicas) or via switchyard."""

    def __init__(self, stack: BenchStack) -> None:
        self.stack = stack
        self.direct_client = new_client()
        self.via_client = new_client({"Authorization": f"Bearer {stack.key}"})
        self._replicas = itertools.cycle(stack.direct_urls)

    def sender(self, path: str, body: dict[str, object]) -> Callable[[], Awaitable[Sample]]:
        data = msgspec.json.encode(body)
        stream = bool(body.get("stream"))
        if path == "direct":
            return lambda: self.direct_client.send(next(self._replicas), data, stream)
        return lambda: self.via_client.send(self.stack.via_url, data, stream)

    async def aclose(self) -> None:
        await self.direct_client.session.close()
        await self.via_client.session.close()


async def _latency_point(paths: Paths, body: dict[str, object], rate_rps: int,
                         rounds: int, seconds: float) -> dict[str, object]:
    per_round = []
    # Failures by kind over all rounds: shed (429/503) or lost (timeouts, resets).
    failed_by: dict[str, Counter[str]] = {"direct": Counter(), "via": Counter()}
    for round_no in range(rounds):
        row: dict[str, float] = {}
        order = ("direct", "via") if round_no % 2 == 0 else ("via", "direct")
        for path in order:
            result = await open_loop(paths.sender(path, body), rate_rps, seconds)
            ok = [s for s in result.samples if s.ok]
            row[f"{path}_failed"] = len(result.samples) - len(ok)
            failed_by[path].update(s.failure for s in result.samples if not s.ok)
            row[f"{path}_lag_p99_ms"] = result.lag_p99_ms
            for what in ("first", "total"):
                values = [getattr(s, f"{what}_ms") for s in ok]
                row[f"{path}_{what}_p50_ms"] = quantile(values, 0.5)
                row[f"{path}_{what}_p99_ms"] = quantile(values, 0.99)
            if path == "via":
                headers = [s.overhead_ms for s in ok if s.overhead_ms is not None]
                row["header_overhead_p50_ms"] = quantile(headers, 0.5)
                row["header_overhead_p99_ms"] = quantile(headers, 0.99)
        for what in ("first", "total"):
            for q in ("p50", "p99"):
                row[f"added_{what}_{q}_ms"] = (row[f"via_{what}_{q}_ms"]
                                               - row[f"direct_{what}_{q}_ms"])
        per_round.append(row)
    summary = {name: statistics.median(r[name] for r in per_round) for name in per_round[0]}
    return {"rate_rps": rate_rps, "median_of_rounds": summary, "per_round": per_round,
            "failed_by": {path: dict(kinds) for path, kinds in failed_by.items() if kinds},
            "load": _uptime()}


async def _throughput(paths: Paths, body: dict[str, object], path: str, clients: int,
                      rounds: int, seconds: float, pids: list[int]) -> dict[str, float]:
    """Closed loop; for the path via switchyard also what the ingress workers
    (`pids`) did per CPU second they used: the rate one busy worker core reaches."""
    client = paths.direct_client if path == "direct" else paths.via_client
    return await _closed_rounds(paths.sender(path, body), client, clients, rounds, seconds,
                                pids if path == "via" else [])


async def _closed_rounds(send: Callable[[], Awaitable[Sample]], client: Client, clients: int,
                         rounds: int, seconds: float, pids: list[int]) -> dict[str, float]:
    """`rounds` closed-loop windows (medians), with what the processes `pids`
    (if any) did per CPU second they used."""
    rps, chunks, failed, rps_cpu, chunks_cpu = [], [], [], [], []
    for _ in range(rounds):
        cpu_s = -sum(stage_profile.cpu_seconds(p) for p in pids)

        def window_closed() -> None:
            nonlocal cpu_s
            cpu_s += sum(stage_profile.cpu_seconds(p) for p in pids)

        timer = asyncio.get_running_loop().call_later(seconds, window_closed)
        result = await closed_loop(send, clients, seconds, lambda c=client: c.chunks_seen)
        timer.cancel()
        rps.append(result.rps)
        chunks.append(result.chunks_per_s)
        failed.append(result.failed)
        if pids and cpu_s > 0:
            rps_cpu.append(result.ok / cpu_s)
            chunks_cpu.append(result.chunks / cpu_s)
    out = {"rps": statistics.median(rps), "chunks_per_s": statistics.median(chunks),
           "failed": max(failed), "load": _uptime()}
    if rps_cpu:
        out["per_ingress_cpu_s"] = {"requests": statistics.median(rps_cpu),
                                    "chunks": statistics.median(chunks_cpu)}
    return out


async def _floor(paths: Paths, clients: int, rounds: int,
                 seconds: float) -> dict[str, dict[str, float]]:
    """aiohttp alone (loadtests/aiohttp_floor.py) under the same closed loop:
    a bare server (echo) and a bare proxy to one replica, each in its own
    process, and what each did per CPU second."""
    out = {}
    data = msgspec.json.encode(BODY)
    for mode in ("echo", "proxy"):
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtests.aiohttp_floor", "--mode", mode, "--port", str(port),
            "--upstream", paths.stack.direct_urls[0],
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def send(url: str = url) -> Awaitable[Sample]:
            return paths.direct_client.send(url, data, False)

        try:
            await _serving(send)
            await closed_loop(send, 8, 0.5)
            out[mode] = await _closed_rounds(send, paths.direct_client, clients, rounds,
                                             seconds, [proc.pid])
        finally:
            proc.terminate()
            await proc.wait()
    return out


async def _serving(send: Callable[[], Awaitable[Sample]]) -> None:
    for _ in range(200):
        if (await send()).ok:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the aiohttp floor server did not start")


async def _profiled(paths: Paths, workdir: Path, clients: int, seconds: float,
                    keep: Path | None) -> dict[str, object]:
    """One worker's CPU per request and its split by stage, under closed-loop load."""
    pids = stage_profile.ingress_pids(workdir)
    cpu_before = sum(stage_profile.cpu_seconds(p) for p in pids)
    spy = asyncio.create_task(stage_profile.record(pids[0], seconds, workdir / "spy.txt"))
    result = await closed_loop(paths.sender("via", BODY), clients, seconds)
    cpu_s = sum(stage_profile.cpu_seconds(p) for p in pids) - cpu_before
    raw = await spy
    if keep is not None:
        keep.write_text(raw)
    cpu_us_per_request = cpu_s / max(1, result.ok) * 1e6
    shares = stage_profile.breakdown(raw)
    return {"rps": result.rps, "ingress_cpu_us_per_request": cpu_us_per_request,
            "stages_us_per_request": {stage: round(share * cpu_us_per_request, 1)
                                      for stage, share in shares.items()},
            "top_functions_share": stage_profile.top_functions(raw),
            "load": _uptime()}


async def _one_stack(workers: int, args: argparse.Namespace, latency: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="switchyard-overhead-") as tmp:
        workdir = Path(tmp)
        stack = await start_stack(workdir, replicas=args.replicas, workers=workers,
                                  simulator_toml=FAST_SIMULATOR, admin=False)
        paths = Paths(stack)
        out: dict[str, object] = {"workers": workers}
        try:
            for path in ("direct", "via"):  # warm pools, leases, caches
                await closed_loop(paths.sender(path, BODY), 8, 1.0)
                await closed_loop(paths.sender(path, STREAM_BODY), 8, 0.5)
            if args.profile_only:
                out["profile"] = await _profiled(
                    paths, workdir, args.clients, args.seconds * 2,
                    args.json.with_suffix(f".spy-{workers}.txt") if args.json else None)
                return out
            if latency:
                out["latency"] = {
                    mode: [await _latency_point(paths, body, rate, args.rounds, args.seconds)
                           for rate in args.rates]
                    for mode, body in (("non_streaming", BODY), ("streaming", STREAM_BODY))}
                if args.latency_only:
                    return out
            pids = stage_profile.ingress_pids(workdir)
            out["max_rps"] = {path: await _throughput(paths, BODY, path, args.clients,
                                                      args.rounds, args.seconds, pids)
                              for path in ("direct", "via")}
            out["sse"] = {path: await _throughput(paths, SSE_BODY, path, args.sse_clients,
                                                  args.rounds, args.seconds, pids)
                          for path in ("direct", "via")}
            out["sse"]["via_chunks_per_s_per_worker"] = (  # type: ignore[index]
                out["sse"]["via"]["chunks_per_s"] / workers)  # type: ignore[index]
            if args.floor and latency:
                out["floor"] = await _floor(paths, args.clients, args.rounds, args.seconds)
            if args.profile:
                out["profile"] = await _profiled(
                    paths, workdir, args.clients, args.seconds * 2,
                    args.json.with_suffix(f".spy-{workers}.txt") if args.json else None)
        finally:
            await paths.aclose()
            await stop_stack(stack)
    return out


async def bench(args: argparse.Namespace) -> dict[str, object]:
    started = time.time()
    stacks = [await _one_stack(w, args, latency=i == 0) for i, w in enumerate(args.workers)]
    return {"rounds": args.rounds, "seconds_per_point": args.seconds, "clients": args.clients,
            "cores": os.cpu_count(), "load_at_start": _uptime(),
            "wall_s": round(time.time() - started, 1), "stacks": stacks}


def print_table(result: dict[str, object]) -> None:
    stacks = result["stacks"]
    assert isinstance(stacks, list)
    first = stacks[0]
    if "latency" in first:
        print(f"\nadded latency (via - direct, medians of {result['rounds']} rounds), "
              f"{first['workers']} worker(s)")
        print(f"{'mode':<15}{'rps':>6}{'p50 ms':>9}{'p99 ms':>9}{'TTFT p50':>10}"
              f"{'header p50':>12}{'header p99':>12}{'failed':>8}")
        for mode, points in first["latency"].items():
            for point in points:
                s = point["median_of_rounds"]
                print(f"{mode:<15}{point['rate_rps']:>6}{s['added_total_p50_ms']:>9.2f}"
                      f"{s['added_total_p99_ms']:>9.2f}{s['added_first_p50_ms']:>10.2f}"
                      f"{s['header_overhead_p50_ms']:>12.3f}{s['header_overhead_p99_ms']:>12.3f}"
                      f"{s['via_failed']:>8.0f}")
        for mode, points in first["latency"].items():
            for point in points:
                for path, kinds in point["failed_by"].items():
                    print(f"  failed at {point['rate_rps']} rps {mode} {path} ({result['rounds']}"
                          " rounds): " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    if "max_rps" in first:
        _print_throughput(stacks)
    for stack in stacks:
        if "profile" in stack:
            p = stack["profile"]
            print(f"\ningress CPU per request ({stack['workers']} worker(s), {p['rps']:.0f} rps): "
                  f"{p['ingress_cpu_us_per_request']:.0f} us")
            for stage, us in p["stages_us_per_request"].items():
                print(f"  {stage:<24}{us:>8.1f} us")


def _print_throughput(stacks: list[dict[str, object]]) -> None:
    print(f"\n{'workers':<9}{'direct rps':>12}{'via rps':>10}{'via rps/worker':>16}"
          f"{'rps/CPU-s':>11}{'direct chunks/s':>17}{'via chunks/s/worker':>21}"
          f"{'chunks/CPU-s':>14}")
    for stack in stacks:
        rps, sse, w = stack["max_rps"], stack["sse"], stack["workers"]
        per_cpu = rps["via"].get("per_ingress_cpu_s", {}).get("requests", float("nan"))
        chunks_cpu = sse["via"].get("per_ingress_cpu_s", {}).get("chunks", float("nan"))
        print(f"{w:<9}{rps['direct']['rps']:>12.0f}{rps['via']['rps']:>10.0f}"
              f"{rps['via']['rps'] / w:>16.0f}{per_cpu:>11.0f}"
              f"{sse['direct']['chunks_per_s']:>17.0f}"
              f"{sse['via_chunks_per_s_per_worker']:>21.0f}{chunks_cpu:>14.0f}")
    for stack in stacks:
        for mode, floor in stack.get("floor", {}).items():
            print(f"aiohttp alone ({mode}): {floor['rps']:.0f} rps, "
                  f"{floor['per_ingress_cpu_s']['requests']:.0f} requests per CPU second")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per point and round")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES_RPS),
                        help="open-loop rates (rps) of the latency points")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients (rps)")
    parser.add_argument("--sse-clients", type=int, default=16)
    parser.add_argument("--profile", action="store_true",
                        help="py-spy one worker under load: CPU per request by stage")
    parser.add_argument("--floor", action="store_true",
                        help="also aiohttp alone (a bare server, a bare proxy): its requests "
                        "per CPU second")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the added latency points (first stack)")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the profile (quick, for work on the hot path)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = uvloop.run(bench(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
