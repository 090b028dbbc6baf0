"""Built-in pickers: turn total scores into one replica."""

from __future__ import annotations

import random

from scheduler.framework import ReplicaId, SchedRequest, Scores


class MaxScore:
    """The highest total; ties broken at random so equal replicas share a burst."""

    name = "max-score"

    def pick(self, req: SchedRequest, scores: Scores, rng: random.Random) -> ReplicaId:
        best = max(scores.values())
        tied = [rid for rid, score in scores.items() if score == best]
        return tied[0] if len(tied) == 1 else rng.choice(tied)


class WeightedRandom:
    """A replica drawn with probability proportional to its total (uniform when all are 0)."""

    name = "weighted-random"

    def pick(self, req: SchedRequest, scores: Scores, rng: random.Random) -> ReplicaId:
        ids = list(scores)
        weights = [max(0.0, scores[rid]) for rid in ids]
        if sum(weights) <= 0.0:
            return rng.choice(ids)
        return rng.choices(ids, weights=weights)[0]


class RoundRobin:
    """Each candidate in turn (by id), ignoring scores: the baseline policy."""

    name = "round-robin"

    def __init__(self) -> None:
        self._last: ReplicaId | None = None

    def pick(self, req: SchedRequest, scores: Scores, rng: random.Random) -> ReplicaId:
        ids = sorted(scores)
        after = [rid for rid in ids if self._last is None or rid > self._last]
        self._last = after[0] if after else ids[0]
        return self._last
