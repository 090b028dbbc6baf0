"""`python -m loadtests.jepsen.replica CONFIG PORT REPLICA_ID TRUTH_PATH`: one
simulated replica in a process of its own (so it can be SIGKILLed like a
vLLM server), writing its ground truth to TRUTH_PATH (appended to, so a
restarted replica adds to what its predecessor wrote). Prints "replica
ready" once it listens; SIGTERM stops it."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import msgspec
import uvloop

from loadtests.simulator.fleet import ReplicaServer
from loadtests.simulator.replica import SimReplica
from loadtests.simulator.truth_log import TruthLog
from scheduler.config import load_config


async def serve(config_path: Path, port: int, replica_id: str, truth_path: Path) -> None:
    sim = msgspec.structs.replace(load_config(config_path, {}).simulator, replicas=1)
    truth = TruthLog(truth_path, replica_id)
    server = ReplicaServer(SimReplica(sim, truth_log=truth), "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print("replica ready", flush=True)
        await stop.wait()
    finally:
        await server.aclose()
        truth.close()


def main() -> int:
    config, port, replica_id, truth = sys.argv[1:5]
    uvloop.run(serve(Path(config), int(port), replica_id, Path(truth)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
