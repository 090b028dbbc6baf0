"""The ingress's retry budget, Envoy-style: retries in a sliding window may
be at most a share of the requests in it, with a floor so that low traffic
can still retry. Without it, a fleet-wide failure doubles the load on
replicas that are already failing.

Counts live in a fixed ring of buckets, so memory does not grow with traffic;
the window slides one bucket at a time.
"""

from __future__ import annotations

import math

BUCKETS_PER_WINDOW = 10


class RetryBudget:
    def __init__(self, ratio: float, min_retries: int, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self._ratio = ratio
        self._min_retries = min_retries
        self._bucket_s = window_s / BUCKETS_PER_WINDOW
        self._requests = [0] * BUCKETS_PER_WINDOW
        self._retries = [0] * BUCKETS_PER_WINDOW
        # Index (time // bucket_s) of the newest bucket in use.
        self._newest: int | None = None

    def note_request(self, now_s: float) -> None:
        """Counts one request (its first attempt)."""
        slot = self._advance(now_s)
        self._requests[slot] += 1

    def try_retry(self, now_s: float) -> bool:
        """True, and the retry counted, when the budget allows one more."""
        slot = self._advance(now_s)
        allowed = max(self._min_retries, math.floor(self._ratio * sum(self._requests)))
        if sum(self._retries) >= allowed:
            return False
        self._retries[slot] += 1
        return True

    def refund(self, now_s: float) -> None:
        """Takes back a retry that could not happen (no replica to go to)."""
        slot = self._advance(now_s)
        if self._retries[slot]:
            self._retries[slot] -= 1

    def _advance(self, now_s: float) -> int:
        """Clears the buckets the window slid past; returns the slot for now."""
        index = int(now_s // self._bucket_s)
        if self._newest is None or index - self._newest >= BUCKETS_PER_WINDOW:
            self._requests[:] = self._retries[:] = [0] * BUCKETS_PER_WINDOW
            self._newest = index
        elif index > self._newest:
            for stale in range(self._newest + 1, index + 1):
                self._requests[stale % BUCKETS_PER_WINDOW] = 0
                self._retries[stale % BUCKETS_PER_WINDOW] = 0
            self._newest = index
        # A clock reading behind the newest bucket counts in the newest one.
        return self._newest % BUCKETS_PER_WINDOW
