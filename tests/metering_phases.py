"""The metering service with its phases printed, for tests/test_metering_kill.py.

`python -m tests.metering_phases CONFIG SEED` runs analytics.metering_main's
service and prints `phase fetched` before each batch's insert, `phase
inserted` after it and `phase acked` once its acks are sent, so the last line
before a SIGKILL says where it struck. A random pause of 0.05-0.15 s after
the insert widens the window between an insert and its acks, which the
kill test must hit, to something a random kill lands in often."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import uvloop

from analytics import usage_consumer
from analytics.metering import MeteringService
from analytics.metering_main import serve
from scheduler.config import load_config

MAX_PAUSE_S = 0.15


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(Path(sys.argv[1]), {})
    rng = random.Random(int(sys.argv[2]))
    real_store_batch = usage_consumer.store_batch
    real_settle = usage_consumer.UsageConsumer._settle

    def store_batch(*args: object) -> tuple[int, int]:
        print("phase fetched", flush=True)
        stored = real_store_batch(*args)  # type: ignore[arg-type]
        print("phase inserted", flush=True)
        # In the store thread: the loop keeps turning, the acks wait.
        time.sleep(rng.uniform(0.05, MAX_PAUSE_S))
        return stored

    async def settle(self: usage_consumer.UsageConsumer, *args: object) -> None:
        await real_settle(self, *args)  # type: ignore[arg-type]
        print("phase acked", flush=True)

    usage_consumer.store_batch = store_batch  # type: ignore[assignment]
    usage_consumer.UsageConsumer._settle = settle  # type: ignore[method-assign]
    uvloop.run(serve(MeteringService(cfg)))


if __name__ == "__main__":
    main()
