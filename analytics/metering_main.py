"""`python -m analytics.metering_main --config PATH`: the metering service as
a plain process, for deployments without Ray and for tests that SIGKILL it.
Prints "metering ready" once it consumes; SIGTERM or SIGINT stop it cleanly,
and it prints its counters as `metering stats {json}` on the way out."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import uvloop

from analytics.metering import MeteringService
from scheduler.config import load_config


async def serve(service: MeteringService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        print("metering ready", flush=True)
        await stop.wait()
    finally:
        await service.aclose()
        # One line a benchmark or an operator reads after the stop.
        print(f"metering stats {json.dumps(service.stats())}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analytics.metering_main")
    parser.add_argument("--config", type=Path, help="TOML file, or JSON written by `up`")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(MeteringService(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
