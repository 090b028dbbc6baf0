"""`python -m loadtests.simulator`: serve simulated vLLM replicas until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path

import msgspec
import uvloop

from loadtests.simulator.fleet import start_fleet
from scheduler.config import SimulatorConfig, load_config
from scheduler.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.simulator` and `switchyard sim`; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        cfg = _simulator_config(args)
        crashed = uvloop.run(_serve(cfg, args.host))
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cannot start the simulator: {exc}", file=sys.stderr)
        return 1
    if crashed:
        print("every replica crashed (fault injected); exiting", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.simulator", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config; its [simulator] table is used")
    parser.add_argument("--replicas", type=_positive_int, help="number of replicas")
    parser.add_argument("--base-port", type=int, help="port of replica 0; replica i gets base + i")
    parser.add_argument("--model", help="served model name")
    parser.add_argument("--seed", type=int, help="seed of the generated text")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _simulator_config(args: argparse.Namespace) -> SimulatorConfig:
    """The config file's simulator table, with the flags given on the command line on top."""
    cfg = load_config(args.config, os.environ).simulator
    flags = {
        "replicas": args.replicas,
        "base_port": args.base_port,
        "model": args.model,
        "seed": args.seed,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    return msgspec.structs.replace(cfg, **given)


async def _serve(cfg: SimulatorConfig, host: str) -> bool:
    """Serves until a signal (False) or until every replica has crashed (True)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        fleet = await start_fleet(cfg, host)
        try:
            for index, url in enumerate(fleet.urls):
                print(f"replica {index} listening on {url}", flush=True)
            return await _first_of(stop.wait(), fleet.wait_all_crashed())
        finally:
            await fleet.aclose()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _first_of(stopped: Awaitable[object], crashed: Awaitable[None]) -> bool:
    """Waits for either; True when the crash came first."""
    async with asyncio.TaskGroup() as group:
        stop_task = group.create_task(stopped)
        crash_task = group.create_task(crashed)
        done, _ = await asyncio.wait((stop_task, crash_task), return_when=asyncio.FIRST_COMPLETED)
        for task in (stop_task, crash_task):
            task.cancel()
    return crash_task in done and stop_task not in done


if __name__ == "__main__":
    sys.exit(main())
