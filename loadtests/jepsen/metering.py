"""`python -m loadtests.jepsen.metering CONFIG AMBIGUOUS_RATIO SEED`: the
metering service (analytics.metering_main's) as its own process, whose
ClickHouse store process fails ambiguously on a share of its inserts
(loadtests/jepsen/ambiguous_store.py). The consumer cannot know those rows
landed; the promise is that it bills each request once anyway. The store
prints "ambiguous insert" on each one it injects."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import uvloop

from analytics.metering import MeteringService
from analytics.metering_main import serve
from scheduler.config import load_config


class AmbiguousMetering(MeteringService):
    store_module = "loadtests.jepsen.ambiguous_store"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(Path(sys.argv[1]), {})
    # Read by the store process, which inherits this environment.
    os.environ["JEPSEN_AMBIGUOUS_RATIO"] = sys.argv[2]
    os.environ["JEPSEN_SEED"] = sys.argv[3]
    uvloop.run(serve(AmbiguousMetering(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
