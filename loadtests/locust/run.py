"""Runs the locust suites against a fresh `switchyard up` and stops all it started.

    python -m loadtests.locust.run mixed [--duration-s 60] [--workers 2]
    python -m loadtests.locust.run soak  [--duration-s 300] [--load 0.8]
    python -m loadtests.locust.run provision --admin-url URL [--keys-file PATH]

`mixed`: the mixed suite (loadtests/locust/locustfile.py) for a fixed time,
back to back. `soak`: first a probe of the maximum (back to back, `--probe-s`),
then `--load` of that rate, paced, for `--duration-s`, sampling the ingress's
memory every 10 s; it fails on any error (the abusive tenant's 429s are
expected) or an RSS drift above `--max-drift-pct`. `--workers N` runs locust
distributed, one master and N workers on 127.0.0.1. Everything lands under
`--out` (default var/loadtest/<mode>/): locust's CSV and HTML reports, its
log, the stack's logs, processes.csv, summary.json (also printed).
`provision`: only the tenants, keys, limits and prices, on a stack already
running (admin key from SWITCHYARD_ADMIN_KEY), for locust started by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from deploy.admin_cli import ADMIN_KEY_ENV, admin_key
from deploy.procs import LOOPBACK, free_port
from loadtests.locust.memory import (
    ProcessSampler,
    Sample,
    cpu_share,
    role_totals,
    rss_drift,
)
from loadtests.locust.results import problems, read_stats, summary, tenant_rps
from loadtests.locust.stack import PROJECT_DIR, TenantPlan, UpStack, provision, warm_up
from scheduler.errors import YardError

LOCUSTFILE = PROJECT_DIR / "loadtests" / "locust" / "locustfile.py"
RSS_WARMUP_S = 30.0
LOCUST_GRACE_S = 90.0


class LocustRun:
    """One headless locust run: a process, or a master with `workers` workers."""

    def __init__(self, out: Path, name: str, host: str, keys_file: Path, users: int,
                 duration_s: float, workers: int, custom: list[str]) -> None:
        self.prefix = out / name
        self.log = out / f"{name}.log"
        self.host = host
        self.keys_file = keys_file
        self.users = users
        self.duration_s = duration_s
        self.workers = workers
        self.custom = custom
        self.procs: list[asyncio.subprocess.Process] = []

    def argvs(self) -> list[list[str]]:
        base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
                "--keys-file", str(self.keys_file), *self.custom]
        main = [*base, "--headless", "--host", self.host, "-u", str(self.users),
                "-r", str(max(1, self.users // 2)), "-t", f"{int(self.duration_s)}s",
                "--stop-timeout", "5", "--csv", str(self.prefix), "--html",
                f"{self.prefix}.html", "--only-summary", "--loglevel", "WARNING"]
        if not self.workers:
            return [main]
        port = free_port()
        master = [*main, "--master", "--master-bind-host", LOOPBACK, "--master-bind-port",
                  str(port), "--expect-workers", str(self.workers),
                  "--expect-workers-max-wait", "60"]
        worker = [*base, "--worker", "--master-host", LOOPBACK, "--master-port", str(port),
                  "--loglevel", "WARNING"]
        return [master] + [worker] * self.workers

    async def run(self) -> None:
        """Until the master (or the lone process) ends; never longer than the
        duration plus a grace, then every process it started is stopped."""
        env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
        with self.log.open("ab") as log:
            for argv in self.argvs():
                self.procs.append(await asyncio.create_subprocess_exec(
                    *argv, cwd=PROJECT_DIR, stdout=log, stderr=log,
                    stdin=asyncio.subprocess.DEVNULL, env=env))
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs)),
                                   self.duration_s + LOCUST_GRACE_S)
        finally:
            await self.stop()

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def _run_sampled(run: LocustRun, out: Path) -> list[Sample]:
    """Runs locust while the stack's processes are sampled into processes.csv."""
    sampler = ProcessSampler([os.getpid()], out / "processes.csv")
    sampler.start()
    try:
        await run.run()
    finally:
        await sampler.aclose()
    return sampler.samples


async def mixed(args: argparse.Namespace, stack: UpStack, keys_file: Path) -> dict:
    run = LocustRun(args.out, "locust", stack.api_url, keys_file, args.users, args.duration_s,
                    args.workers, ["--abusive-rps", str(args.abusive_rps)])
    samples = await _run_sampled(run, args.out)
    rows = read_stats(run.prefix)
    return {"rows": summary(rows), "problems": problems(rows), "cpu_s": cpu_share(samples)}


async def soak(args: argparse.Namespace, stack: UpStack, keys_file: Path) -> dict:
    abusive = ["--abusive-rps", str(args.abusive_rps)]
    probe = LocustRun(args.out, "probe", stack.api_url, keys_file, args.users, args.probe_s,
                      args.workers, abusive)
    await probe.run()
    max_rps = tenant_rps(read_stats(probe.prefix))
    target_rps = args.load * max_rps
    run = LocustRun(args.out, "locust", stack.api_url, keys_file, args.users, args.duration_s,
                    args.workers, [*abusive, "--rps-per-user", f"{target_rps / args.users:.4f}"])
    samples = await _run_sampled(run, args.out)
    rows = read_stats(run.prefix)
    rss = rss_drift(role_totals(samples, "ingress"), RSS_WARMUP_S)
    found = problems(rows)
    if not rss:
        found.append("too few memory samples of the ingress")
    elif rss["rss_drift_pct"] > args.max_drift_pct:
        found.append(f"ingress RSS drifted {rss['rss_drift_pct']} % (> {args.max_drift_pct})")
    return {"max_rps": round(max_rps, 1), "target_rps": round(target_rps, 1),
            "achieved_rps": round(tenant_rps(rows), 1), "ingress_memory": rss,
            "rows": summary(rows), "problems": found, "cpu_s": cpu_share(samples)}


async def main_async(args: argparse.Namespace) -> dict:
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    report: dict = {"mode": args.command, "workers": args.workers, "users": args.users,
                    "ray_worker_niceness": args.ray_worker_niceness,
                    "duration_s": args.duration_s, "load_average_before": load_average()}
    started_s = time.monotonic()
    stack = await UpStack.start(args.out / "stack", args.up_arg, args.ray_worker_niceness)
    try:
        keys_file = args.out / "keys.json"
        keys = await provision(stack.admin_url, await stack.admin_key(),
                               TenantPlan(tenants=args.tenants), keys_file)
        await warm_up(stack.api_url, keys)
        run = mixed if args.command == "mixed" else soak
        report.update(await run(args, stack, keys_file))
        await stack.save_metrics(args.out / "ingress_metrics.txt")
    finally:
        await stack.stop()
    report["load_average_after"] = load_average()
    report["wall_s"] = round(time.monotonic() - started_s, 1)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.locust.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("mixed", "soak", "provision"))
    parser.add_argument("--duration-s", type=float, help="default: 60 (mixed), 300 (soak)")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0,
                        help="locust workers under one master (0: one locust process)")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--abusive-rps", type=float, default=10.0)
    parser.add_argument("--probe-s", type=float, default=30.0, help="soak: the maximum's probe")
    parser.add_argument("--load", type=float, default=0.8, help="soak: share of the maximum")
    parser.add_argument("--max-drift-pct", type=float, default=10.0)
    parser.add_argument("--up-arg", action="append", default=[],
                        help="passed on to `switchyard up` (repeatable), e.g. --up-arg=--workers=2")
    parser.add_argument("--ray-worker-niceness", type=int, default=0,
                        help="of the stack's Ray actors (Ray's own default: 15)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--admin-url", default="http://127.0.0.1:8090", help="provision")
    parser.add_argument("--admin-key", help=f"provision (default: ${ADMIN_KEY_ENV})")
    parser.add_argument("--keys-file", type=Path, default=Path("var/loadtest/keys.json"),
                        help="provision: where the keys go")
    args = parser.parse_args(argv)
    if args.duration_s is None:
        args.duration_s = 60.0 if args.command == "mixed" else 300.0
    if args.out is None:
        suffix = f"-{args.workers}w" if args.workers else ""
        args.out = PROJECT_DIR / "var" / "loadtest" / f"{args.command}{suffix}"
    args.out = args.out.resolve()
    return args


async def provision_only(args: argparse.Namespace) -> None:
    keys_file = args.keys_file.resolve()
    await provision(args.admin_url, admin_key(args, dict(os.environ)),
                    TenantPlan(tenants=args.tenants), keys_file)
    print(f"tenants and keys written to {keys_file}")


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    if args.command == "provision":
        try:
            uvloop.run(provision_only(args))
        except YardError as exc:
            print(f"provision: {exc.message}", file=sys.stderr)
            return 1
        return 0
    report = uvloop.run(main_async(args))
    text = json.dumps(report, indent=1)
    (args.out / "summary.json").write_text(text + "\n")
    print(text)
    for problem in report["problems"]:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
