"""Built-in pickers: turn the candidates' weighted totals into one replica."""

from __future__ import annotations

import random

from scheduler.framework import ReplicaId, SchedRequest


class MaxScore:
    """The highest total; ties broken at random so equal replicas share a burst."""

    name = "max-score"

    def pick(self, req: SchedRequest, candidates: list[ReplicaId], totals: list[float],
             rng: random.Random) -> ReplicaId:
        best = max(totals)
        if totals.count(best) == 1:
            return candidates[totals.index(best)]
        return rng.choice([rid for rid, total in zip(candidates, totals, strict=True)
                           if total == best])


class WeightedRandom:
    """A replica drawn with probability proportional to its total (uniform when all are 0)."""

    name = "weighted-random"

    def pick(self, req: SchedRequest, candidates: list[ReplicaId], totals: list[float],
             rng: random.Random) -> ReplicaId:
        weights = [total if total > 0.0 else 0.0 for total in totals]
        if sum(weights) <= 0.0:
            return rng.choice(candidates)
        return rng.choices(candidates, weights=weights)[0]


class RoundRobin:
    """Each candidate in turn (by id), ignoring scores: the baseline policy."""

    name = "round-robin"

    def __init__(self) -> None:
        self._last: ReplicaId | None = None

    def pick(self, req: SchedRequest, candidates: list[ReplicaId], totals: list[float],
             rng: random.Random) -> ReplicaId:
        ids = sorted(candidates)
        after = [rid for rid in ids if self._last is None or rid > self._last]
        self._last = after[0] if after else ids[0]
        return self._last
