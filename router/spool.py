"""The disk spool of usage events NATS did not take (RELIABILITY T30).

One SQLite file per ingress port under var_dir, in WAL mode, written with
synchronous=FULL: an event is on disk before `put` returns, and survives a
process kill (and, with fsync, the machine's). All SQLite calls run in one
worker thread (the connection's own), so nothing blocks the event loop.
Rows are keyed by request id: a second copy of an event is ignored, and the
drainer (router/outbox.py) deletes a row only after JetStream acked it,
publishing with Nats-Msg-Id = request id, so a publish repeated after a
crash is stored once (JetStream's window; ClickHouse dedups beyond it)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from router.metrics import Metrics
from scheduler.config import Config
from scheduler.wire import UsageEvent, encode, usage_decoder

T = TypeVar("T")

_SCHEMA = ("CREATE TABLE IF NOT EXISTS usage ("
           "seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, "
           "payload BLOB NOT NULL)")


def spool_path(cfg: Config) -> Path:
    """One file per ingress port: the workers of a port share it (SQLite
    locks), and a restarted ingress finds what it left."""
    return Path(cfg.var_dir) / "spool" / f"usage-{cfg.ingress.port}.sqlite"


class UsageSpool:
    def __init__(self, path: Path, max_events: int, metrics: Metrics) -> None:
        self.path = path
        self.max_events = max_events
        self._metrics = metrics
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-spool")
        self._db: sqlite3.Connection | None = None
        self.depth_events = 0

    async def start(self) -> None:
        """Opens (or creates) the file; events left by an earlier run count."""
        await self._run(self._open)

    async def aclose(self) -> None:
        await self._run(self._close)
        # The close above was its last job: nothing left to wait for.
        self._thread.shutdown(wait=False)

    def full(self) -> bool:
        return self.depth_events >= self.max_events

    async def put(self, events: Sequence[UsageEvent]) -> None:
        """Stores `events` durably (one transaction)."""
        rows = [(event.request_id, encode(event)) for event in events]
        await self._run(self._insert, rows)
        self._metrics.usage_spooled.inc(len(rows))

    async def oldest(self, limit: int) -> list[UsageEvent]:
        payloads = await self._run(self._select, limit)
        return [usage_decoder.decode(payload) for payload in payloads]

    async def delete(self, request_ids: Sequence[str]) -> None:
        await self._run(self._delete, list(request_ids))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # --- in the worker thread ------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # Another ingress worker on the same port may hold the write lock briefly.
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(_SCHEMA)
        self._db = db
        self._count()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _insert(self, rows: list[tuple[str, bytes]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR IGNORE INTO usage (request_id, payload) VALUES (?, ?)", rows)
        self._count()

    def _select(self, limit: int) -> list[bytes]:
        assert self._db is not None
        cursor = self._db.execute("SELECT payload FROM usage ORDER BY seq LIMIT ?", (limit,))
        return [row[0] for row in cursor]

    def _delete(self, request_ids: list[str]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM usage WHERE request_id = ?",
                                 [(rid,) for rid in request_ids])
        self._count()

    def _count(self) -> None:
        assert self._db is not None
        (depth,) = self._db.execute("SELECT count(*) FROM usage").fetchone()
        # An int assignment: read on the loop without a lock.
        self.depth_events = depth
        self._metrics.usage_spool_depth.set(depth)
