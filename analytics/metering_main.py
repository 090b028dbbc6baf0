"""`python -m analytics.metering_main --config PATH`: the metering service as
a plain process, for deployments without Ray and for tests that SIGKILL it.
Prints "metering ready" once it consumes; SIGTERM or SIGINT stop it cleanly,
and it prints its counters as `metering stats {json}` on the way out."""

from __future__ import annotations

import asyncio
import json
import signal

import uvloop

from analytics.metering import MeteringService
from scheduler.config import process_config


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
    cfg = process_config("python -m analytics.metering_main", argv)
    uvloop.run(serve(MeteringService(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
