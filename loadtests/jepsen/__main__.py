"""`python -m loadtests.jepsen [--duration-s 180] [--work DIR] ...`: one T31
run. Starts the stack, sends the traffic while the fault schedule runs,
waits for quiescence, gathers ClickHouse's rows and the open quota charges,
audits (analytics/billing_audit.py), prints the report and a JSON summary
line (`T31 {...}`), and exits 1 on a violation, 2 if the run itself failed."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from analytics.billing_audit import audit, render
from loadtests.jepsen.check import ABORT_GAP_TOKENS, allowances
from loadtests.jepsen.collect import (
    open_charges,
    quiesce,
    read_artifacts,
    read_rows,
    rollup_drift,
    write_jsonl,
)
from loadtests.jepsen.faults import FaultSchedule
from loadtests.jepsen.stack import Stack
from loadtests.jepsen.traffic import Clients, History


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.jepsen", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=180.0, help="traffic and faults")
    parser.add_argument("--work", type=Path, help="run directory (default: a new temporary one,"
                        " kept)")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--concurrency", type=int, default=6, help="client loops")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--fault-period-s", type=float, default=12.0)
    parser.add_argument("--ambiguous-ratio", type=float, default=0.05,
                        help="share of ClickHouse inserts that commit and then raise")
    parser.add_argument("--abort-gap-tokens", type=int, default=ABORT_GAP_TOKENS,
                        help="completion tokens a request whose client left may be billed"
                        " under the replica's count (T16's bound)")
    parser.add_argument("--ray-address", default="", help="join this Ray cluster (default:"
                        " start a local head)")
    return parser


async def run(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    stack = Stack(work, args.replicas, args.ambiguous_ratio, args.seed)
    summary: dict[str, object] = {"work": str(work), "duration_s": args.duration_s}
    try:
        await stack.start()
        print(f"stack up: ingresses {stack.urls}", flush=True)
        history = History(work / "history.jsonl")
        faults = FaultSchedule(stack, random.Random(args.seed + 1), args.fault_period_s)
        until_s = time.monotonic() + args.duration_s
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(Clients(stack.urls, stack.tenants, history, rng).run(
                    args.concurrency, until_s))
                group.create_task(faults.run(until_s))
        finally:
            history.close()
        summary["faults"] = faults.log.counts()
        summary.update(await quiesce(stack))
        tenant_ids = [t.tenant_id for t in stack.tenants]
        write_jsonl(work / "charges.jsonl", await open_charges(stack.config, tenant_ids))
        # chDB allows one process per path: the metering process lets go first.
        assert stack.metering is not None
        await stack.metering.stop()
        write_jsonl(work / "rows.jsonl", await asyncio.to_thread(read_rows, stack.config))
        summary.update(await asyncio.to_thread(rollup_drift, stack.config))
    finally:
        await stack.stop()
    log = (work / "logs" / "metering.log").read_text(errors="replace")
    summary["ambiguous_inserts"] = log.count("ambiguous insert of")
    report = audit(*read_artifacts(work), allow=allowances(args.abort_gap_tokens))
    print(render(report))
    print(f"  rollups beside usage_raw FINAL: {summary['rollup_requests_drift']:+d} requests,"
          f" {summary['rollup_completion_tokens_drift']:+d} completion tokens")
    summary.update(report.stats)
    summary["violations"] = len(report.violations)
    print("T31 " + json.dumps(summary), flush=True)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="switchyard-jepsen-"))
    work.mkdir(parents=True, exist_ok=True)
    from actors.ray_runtime import init_local_ray, shutdown_ray

    init_local_ray(num_cpus=2, namespace="switchyard-jepsen", address=args.ray_address)
    try:
        return uvloop.run(run(args, work))
    except Exception as exc:  # noqa: BLE001 - the run failed, not the audit
        print(f"T31 run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_ray()


if __name__ == "__main__":
    raise SystemExit(main())
