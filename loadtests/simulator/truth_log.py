"""Ground truth on disk: one JSON line per token a request is handed and one
when it ends, appended to a file as they happen.

The in-memory ledger (ledger.py) dies with a SIGKILLed replica process; this
log does not (each line is one write(2) into the page cache), so a checker
can tell, after the fact, how many tokens a request really got on a replica
that was killed under it. The last line of a (replica, request id) holds
its counts; lines of an unfinished request have `finish_reason` null.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from loadtests.simulator.ledger import RequestRecord


class TruthLine(msgspec.Struct, kw_only=True):
    replica_id: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    # "stop", "length" or "abort" once the request ended; None before.
    finish_reason: str | None = None


_encode = msgspec.json.Encoder().encode


class TruthLog:
    """Appends to `path` (created if needed) on behalf of replica `replica_id`."""

    def __init__(self, path: Path, replica_id: str) -> None:
        self.replica_id = replica_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(self, record: RequestRecord) -> None:
        """The record's counts now. One small unbuffered write: a few
        microseconds, and already safe from a kill once it returns."""
        os.write(self._fd, _encode(TruthLine(
            replica_id=self.replica_id, request_id=record.request_id,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            finish_reason=record.finish_reason)) + b"\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
