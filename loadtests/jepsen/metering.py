"""`python -m loadtests.jepsen.metering CONFIG AMBIGUOUS_RATIO SEED`: the
metering service (analytics.metering_main's) as its own process, whose
ClickHouse store fails ambiguously on a share of its inserts: the rows are
committed, then the insert raises, as when the connection to a ClickHouse
server resets after it took the body (RELIABILITY T29, chDB form). The
consumer cannot know the rows landed; the promise is that it bills each
request once anyway. Prints "ambiguous insert" on each one it injects."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from analytics.metering import MeteringService
from analytics.metering_main import serve
from analytics.store import UsageStore
from scheduler.config import Config, load_config
from scheduler.wire import UsageEvent


class AmbiguousInsert(ConnectionResetError):
    """The rows were committed; the answer was lost."""


class AmbiguousStore(UsageStore):
    def __init__(self, store: UsageStore, ratio: float, rng: random.Random) -> None:
        super().__init__(store.client, store.database)
        self._ratio = ratio
        self._rng = rng

    def insert(self, events: Sequence[UsageEvent], costs_nusd: Sequence[int],
               dedup_token: str) -> None:
        super().insert(events, costs_nusd, dedup_token)
        if events and self._rng.random() < self._ratio:
            print(f"ambiguous insert of {len(events)} events", flush=True)
            raise AmbiguousInsert("connection reset after the insert was committed")


class AmbiguousMetering(MeteringService):
    def __init__(self, cfg: Config, ratio: float, rng: random.Random) -> None:
        super().__init__(cfg)
        self._ratio = ratio
        self._rng = rng

    def _open_store(self) -> UsageStore:
        return AmbiguousStore(super()._open_store(), self._ratio, self._rng)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(Path(sys.argv[1]), {})
    service = AmbiguousMetering(cfg, float(sys.argv[2]), random.Random(int(sys.argv[3])))
    uvloop.run(serve(service))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
