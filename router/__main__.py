"""`python -m router --config PATH [--workers N]`: the ingress. One worker
serves in this process; more run as child processes on the same port under
this one (router/workers.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import msgspec
import uvloop

from router.workers import die_with_parent, resolve_workers, supervise
from scheduler.config import Config, process_config

# prometheus_client reads it when first imported: set before router.app is.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router", add_help=False)
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes (default: ingress.workers)")
    # Set by the supervisor for its children.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _parser().parse_known_args(argv)
    cfg = process_config("python -m router", rest)
    workers = resolve_workers(args.workers or cfg.ingress.workers, os.cpu_count())
    if args.worker is not None:
        die_with_parent(args.supervisor)
        return _serve(_limits_shared_by(cfg, workers), args.metrics_dir, reuse_port=True)
    if workers == 1:
        return _serve(cfg, None, reuse_port=False)
    metrics_dir = Path(cfg.var_dir) / "run" / f"metrics-{cfg.ingress.port}"
    supervisor = os.getpid()

    def argv_of(index: int) -> list[str]:
        return [sys.executable, "-m", "router", *rest, "--workers", str(workers),
                "--worker", str(index),
                "--supervisor", str(supervisor), "--metrics-dir", str(metrics_dir)]

    return uvloop.run(supervise(argv_of, workers, metrics_dir))


def _limits_shared_by(cfg: Config, workers: int) -> Config:
    """While a quota shard is away each process admits from its own bucket
    of limit // quota.ingress_processes: that count takes in at least this
    ingress's own workers."""
    if cfg.quota.ingress_processes >= workers:
        return cfg
    return msgspec.structs.replace(cfg, quota=msgspec.structs.replace(
        cfg.quota, ingress_processes=workers))


def _serve(cfg: Config, metrics_dir: Path | None, reuse_port: bool) -> int:
    if metrics_dir is not None:
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
    from aiohttp import web

    from router.app import create_app

    uvloop.install()
    web.run_app(create_app(cfg, metrics_dir), host=cfg.ingress.host, port=cfg.ingress.port,
                reuse_port=reuse_port, handler_cancellation=True, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
