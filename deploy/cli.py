"""The `switchyard` command: `up` (the local stack), `replicas`, `sim`, and the
admin API's `tenants`, `keys`, `prices`, `audit`, `usage`, `billing` (plus
`admin-key` to bootstrap)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec

from deploy.admin_cli import add_parsers as add_admin_parsers
from deploy.replicas_cli import add_parser as add_replicas_parser
from scheduler.config import Config, ReplicaConfig, load_config
from scheduler.errors import ConfigError, YardError

RUN_CONFIG = Path("var/run/config.json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack on 127.0.0.1")
    up.add_argument("--config", type=Path, help="TOML config (default: built-in)")
    up.add_argument("--replica", action="append", default=[], metavar="URL",
                    help="route to this OpenAI-compatible server (repeatable); "
                         "default: simulated replicas")
    up.add_argument("--port", type=int, help="API port (default 8080)")
    up.add_argument("--workers", type=int, metavar="N",
                    help="ingress processes on the API port (default: ingress.workers; "
                         "0: one per core, at most 2)")
    add_replicas_parser(sub, f"TOML config (default: {RUN_CONFIG} of a running stack)")
    add_admin_parsers(sub, f"TOML config (default: {RUN_CONFIG} of a running stack)")
    admin_key = sub.add_parser("admin-key", help="issue a platform admin key into the store "
                               "directly and print it (once)")
    admin_key.add_argument("--config", type=Path,
                           help=f"TOML config (default: {RUN_CONFIG} of a running stack)")
    admin_key.add_argument("--name", default="bootstrap")
    sim = sub.add_parser("sim", help="run simulated vLLM replicas", add_help=False)
    sim.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _up_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, os.environ)
    if args.replica:
        cfg = msgspec.structs.replace(
            cfg, replicas=tuple(ReplicaConfig(url=u) for u in args.replica))
    if args.port is not None:
        cfg = msgspec.structs.replace(
            cfg, ingress=msgspec.structs.replace(cfg.ingress, port=args.port))
    if args.workers is not None:
        if args.workers < 0:
            raise ConfigError("--workers must be 0 (one per core, at most 2) or more")
        cfg = msgspec.structs.replace(
            cfg, ingress=msgspec.structs.replace(cfg.ingress, workers=args.workers))
    return cfg


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    import uvloop

    from actors.ray_runtime import init_local_ray, shutdown_ray
    from deploy.stack import resolve_paths, run_stack

    cfg = resolve_paths(_up_config(args))
    # Ray starts before the event loop (ray.init blocks); a SIGTERM meanwhile
    # must still reach the `finally` that shuts Ray down.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print("switchyard: starting Ray (local head on 127.0.0.1)", flush=True)
        init_local_ray(cfg.ray.num_cpus, cfg.ray.namespace, cfg.ray.address)
        return uvloop.run(run_stack(cfg))
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown_ray()


def _running_stack_config(args: argparse.Namespace) -> Config:
    """--config, else the config of the stack running here, else defaults."""
    path = args.config or (RUN_CONFIG if RUN_CONFIG.exists() else None)
    return load_config(path, os.environ)


def cmd_replicas(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from deploy.replicas_cli import run_replicas

    try:
        return asyncio.run(run_replicas(_running_stack_config(args), args, sys.stdout))
    except YardError as exc:
        print(f"switchyard: {exc.message}", file=sys.stderr)
    except RedisError as exc:
        print(f"switchyard: Redis unreachable: {exc}", file=sys.stderr)
    return 1


def cmd_admin(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from deploy.admin_cli import bootstrap_admin_key, run_admin

    cfg = _running_stack_config(args)
    try:
        if args.command == "admin-key":
            return asyncio.run(bootstrap_admin_key(cfg, args.name, sys.stdout))
        return asyncio.run(run_admin(cfg, args, sys.stdout))
    except YardError as exc:
        print(f"switchyard: {exc.message}", file=sys.stderr)
    except RedisError as exc:
        print(f"switchyard: Redis unreachable: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sim"]:
        # The simulator parses its own flags (argparse's REMAINDER cannot
        # pass on a leading `--flag`).
        from loadtests.simulator.__main__ import main as sim_main

        return sim_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "replicas":
            return cmd_replicas(args)
        return cmd_admin(args)
    except ConfigError as exc:
        print(f"switchyard: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
