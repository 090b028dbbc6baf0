"""The metering service with its phases printed, for tests/test_metering_kill.py.

`python -m tests.metering_phases CONFIG SEED` runs analytics.metering_main's
service and prints `phase fetched` before each batch's insert, `phase
inserted` after it and `phase acked` once its acks are sent, so the last line
before a SIGKILL says where it struck. A random pause of 0.05-0.15 s after
the insert widens the window between an insert and its acks, which the
kill test must hit, to something a random kill lands in often.

The insert runs in the store process, which imports this module to call
`store_batch_with_phases` (it travels by reference); its prints reach the
same log, and its pause is seeded from the environment."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path

import uvloop

from analytics import usage_consumer
from analytics.metering import MeteringService
from analytics.metering_main import serve
from analytics.store import UsageStore
from scheduler.config import load_config

MAX_PAUSE_S = 0.15
SEED_ENV = "SWITCHYARD_TEST_PHASES_SEED"

_real_store_batch = usage_consumer.store_batch
_real_settle = usage_consumer.UsageConsumer._settle
_pauses = random.Random(int(os.environ.get(SEED_ENV, "0")))


def store_batch_with_phases(store: UsageStore, payload: bytes) -> tuple[int, int]:
    print("phase fetched", flush=True)
    stored = _real_store_batch(store, payload)
    print("phase inserted", flush=True)
    # In the store process: the service's loop keeps turning, the acks wait.
    time.sleep(_pauses.uniform(0.05, MAX_PAUSE_S))
    return stored


async def settle_with_phase(self: usage_consumer.UsageConsumer, *args: object) -> None:
    await _real_settle(self, *args)  # type: ignore[arg-type]
    print("phase acked", flush=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(Path(sys.argv[1]), {})
    # The store process inherits it.
    os.environ[SEED_ENV] = sys.argv[2]
    # This module under its import name, not __main__: the store process
    # finds the wrapper by that name.
    from tests import metering_phases

    usage_consumer.store_batch = metering_phases.store_batch_with_phases  # type: ignore[assignment]
    usage_consumer.UsageConsumer._settle = settle_with_phase  # type: ignore[method-assign]
    uvloop.run(serve(MeteringService(cfg)))


if __name__ == "__main__":
    main()
