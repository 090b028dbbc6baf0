"""`python -m loadtests.jepsen.ambiguous_store` (started by StoreProcess for
loadtests.jepsen.metering): the usage store's child process, whose inserts
fail ambiguously on a share of calls: the rows are committed, then the
insert raises, as when the connection to a ClickHouse server resets after it
took the body (RELIABILITY T29, chDB form). The ratio and seed come from the
environment the metering process sets (JEPSEN_AMBIGUOUS_RATIO, JEPSEN_SEED)."""

from __future__ import annotations

import os
import random

from analytics.store import REQUEST_ID_COLUMN, Columns, UsageStore
from analytics.store_process import child_main


class AmbiguousInsert(ConnectionResetError):
    """The rows were committed; the answer was lost."""


class AmbiguousStore(UsageStore):
    def __init__(self, store: UsageStore, ratio: float, rng: random.Random) -> None:
        super().__init__(store.client, store.database)
        self._ratio = ratio
        self._rng = rng

    def insert(self, columns: Columns, dedup_token: str) -> None:
        super().insert(columns, dedup_token)
        rows = len(columns[REQUEST_ID_COLUMN])
        if rows and self._rng.random() < self._ratio:
            print(f"ambiguous insert of {rows} events", flush=True)
            raise AmbiguousInsert("connection reset after the insert was committed")


def _ambiguous(store: UsageStore) -> UsageStore:
    # A restarted store process draws new faults: the seed moves with its PID.
    seed = int(os.environ.get("JEPSEN_SEED", "0")) * 100_003 + os.getpid()
    return AmbiguousStore(store, float(os.environ.get("JEPSEN_AMBIGUOUS_RATIO", "0")),
                          random.Random(seed))


if __name__ == "__main__":
    child_main(_ambiguous)
