"""Load scores kept current between decisions instead of recomputed by each.

Between two decisions only a few replicas' load changes: the one just chosen
(one more request in flight), one whose request completed, one that sent a
load report. The core notes each such replica in a `LoadJournal`. A
`LoadTotals` per candidate list keeps every load scorer's raw values, their
min and max, the scores and the weighted load total of each candidate, and
catches up from the journal: a changed replica's score is recomputed alone,
unless its change moved the min or max (min-max scaling then rescales every
score of that scorer). A decision then only adds the few holders' prefix
scores to a copy of the load totals.

Every number is computed by the same expression, in the same order, as the
plain path (`dense_answer`, then the profile's fold), so totals, and so
decisions, are identical to the last bit; a test replays traces through both.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import add
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from scheduler.framework import ReplicaId, ReplicaView, SchedRequest, Scores

# Changes kept for readers; one further behind recomputes from the replicas.
JOURNAL_MAX_CHANGES = 4_096


@runtime_checkable
class LoadScorer(Protocol):
    """A dense scorer computed from each replica's own load, `value(model,
    replica)`: a ranked one scores the values by min-max scaling (lowest 1,
    highest 0), an unranked one's value is its score."""

    name: str
    ranked: bool

    def value(self, model: str, replica: ReplicaView) -> float: ...


@runtime_checkable
class RelievedLoadScorer(LoadScorer, Protocol):
    """A ranked load scorer that subtracts a per-request `relief` from the
    values of the few replicas it names before scaling (what a replica that
    holds the prompt saves), so its cost stays with those few."""

    def relief(self, req: SchedRequest) -> Scores: ...


def lower_is_better(values: list[float]) -> list[float]:
    """Min-max scaling that gives the lowest value 1 and the highest 0."""
    return scaled(values, min(values), max(values))


def scaled(values: list[float], lo: float, hi: float) -> list[float]:
    """`lower_is_better` given the values' min and max."""
    if hi <= lo:
        return [1.0] * len(values)
    scale = 1.0 / (hi - lo)
    return [(hi - v) * scale for v in values]


def dense_answer(scorer: LoadScorer, req: SchedRequest, replicas: list[ReplicaView]) -> list[float]:
    """A load scorer's scores computed afresh (its `score`)."""
    model, value = req.model, scorer.value
    values = [value(model, r) for r in replicas]
    if not scorer.ranked:
        return values
    # A protocol isinstance check costs microseconds; the method is enough.
    relieve = getattr(scorer, "relief", None)
    relief = relieve(req) if relieve is not None else None
    if relief:
        get = relief.get
        values = [v - get(r.id, 0.0) for v, r in zip(values, replicas, strict=True)]
    return lower_is_better(values)


def fold(answers: Sequence[list[float]], weights: Sequence[float]) -> list[float]:
    """Weighted sum of dense answers, added in order (the profile's sum)."""
    totals = answers[0][:] if weights[0] == 1.0 else [s * weights[0] for s in answers[0]]
    for answer, weight in zip(answers[1:], weights[1:], strict=True):
        if weight == 1.0:
            totals = list(map(add, totals, answer))
        else:
            totals = [t + s * weight for t, s in zip(totals, answer, strict=True)]
    return totals


class LoadJournal:
    """The replicas whose load changed, in order; readers keep their position."""

    __slots__ = ("changed", "start")

    def __init__(self) -> None:
        self.start = 0
        self.changed: list[ReplicaId] = []

    @property
    def end(self) -> int:
        return self.start + len(self.changed)

    def note(self, replica_id: ReplicaId) -> None:
        changed = self.changed
        changed.append(replica_id)
        if len(changed) > JOURNAL_MAX_CHANGES:
            self.start += len(changed)
            changed.clear()

    def since(self, position: int) -> list[ReplicaId] | None:
        """Changes after `position`; None when they are no longer kept."""
        if position < self.start:
            return None
        return self.changed[position - self.start:]


class LoadTotals:
    """The load scorers' answers and weighted totals for one candidate list
    (one model, one state version), kept current by the journal."""

    def __init__(self, model: str, replicas: list[ReplicaView], position: dict[ReplicaId, int],
                 scorers: Sequence[tuple[LoadScorer, float]], journal: LoadJournal) -> None:
        self.model, self.replicas, self.position = model, replicas, position
        self.readers = [(scorer.value, scorer.ranked) for scorer, _ in scorers]
        self.relievers = [(j, scorer.relief) for j, (scorer, _) in enumerate(scorers)
                          if isinstance(scorer, RelievedLoadScorer)]
        self.weights = [weight for _, weight in scorers]
        self.journal = journal
        self.seen = journal.end
        self.values: list[list[float]] = []
        self.bounds: list[tuple[float, float]] = []
        self.scores: list[list[float]] = []
        self.totals: list[float] = []
        self._rebuild()

    def answers(self, req: SchedRequest) -> tuple[list[list[float]], list[float]]:
        """Each load scorer's scores for `req`, and their weighted totals (a fresh list)."""
        self._sync()
        answers = self.scores[:]
        if not self.relievers:
            return answers, self.totals[:]
        changed: set[int] = set()
        rescaled = False
        for j, relief in self.relievers:
            saved = relief(req)
            if saved:
                answers[j], moved = self._relieved(j, saved, changed)
                rescaled = rescaled or moved
        if rescaled:
            return answers, fold(answers, self.weights)
        totals = self.totals[:]
        for i in changed:
            totals[i] = self._total(answers, i)
        return answers, totals

    def _relieved(self, j: int, relief: Scores, changed: set[int]) -> tuple[list[float], bool]:
        """Scorer j's scores with `relief` subtracted; True when that moved its
        bounds (then every score is rescaled, else only the relieved ones)."""
        position = self.position
        values = self.values[j][:]
        held = []
        for rid, saved in relief.items():
            i = position.get(rid)
            if i is not None:
                values[i] -= saved
                held.append(i)
        lo, hi = self.bounds[j]
        relieved_lo, relieved_hi = min(values), max(values)
        if relieved_lo != lo or relieved_hi != hi:
            return scaled(values, relieved_lo, relieved_hi), True
        scores = self.scores[j][:]
        if hi > lo:
            scale = 1.0 / (hi - lo)
            for i in held:
                scores[i] = (hi - values[i]) * scale
        changed.update(held)
        return scores, False

    def _sync(self) -> None:
        journal = self.journal
        changed = journal.since(self.seen)
        if changed is None or len(changed) > len(self.replicas):
            self._rebuild()
            return
        if not changed:
            return
        self.seen = journal.end
        touched = set(map(self.position.get, changed))
        touched.discard(None)
        model, replicas, all_scores = self.model, self.replicas, self.scores
        patched: set[int] = set()
        rescaled = False
        for j, (value, ranked) in enumerate(self.readers):
            values, (lo, hi) = self.values[j], self.bounds[j]
            moved = []
            for i in touched:
                new, old = value(model, replicas[i]), values[i]
                if new == old:
                    continue
                values[i] = new
                moved.append(i)
                if ranked:
                    if new < lo:
                        lo = new
                    elif old == lo:
                        lo = min(values)
                    if new > hi:
                        hi = new
                    elif old == hi:
                        hi = max(values)
            if not moved:
                continue
            patched.update(moved)
            if not ranked:
                scores = all_scores[j] = all_scores[j][:]
                for i in moved:
                    scores[i] = values[i]
            elif (lo, hi) != self.bounds[j]:
                # Min-max scaling: new bounds change every replica's score.
                self.bounds[j] = (lo, hi)
                all_scores[j] = scaled(values, lo, hi)
                rescaled = True
            elif hi > lo:
                scores = all_scores[j] = all_scores[j][:]
                scale = 1.0 / (hi - lo)
                for i in moved:
                    scores[i] = (hi - values[i]) * scale
        if rescaled:
            self.totals = fold(all_scores, self.weights)
        elif patched:
            totals = self.totals
            total = self._total
            for i in patched:
                totals[i] = total(all_scores, i)

    def _rebuild(self) -> None:
        self.seen = self.journal.end
        model, replicas = self.model, self.replicas
        self.values = [[value(model, r) for r in replicas] for value, _ in self.readers]
        self.bounds = [(min(v), max(v)) if v else (0.0, 0.0) for v in self.values]
        self.scores = [lower_is_better(v) if ranked and v else v[:]
                       for (_, ranked), v in zip(self.readers, self.values, strict=True)]
        self.totals = fold(self.scores, self.weights) if replicas else []

    def _total(self, answers: list[list[float]], i: int) -> float:
        """Candidate i's total, summed as `fold` sums it."""
        weights = self.weights
        total = answers[0][i] * weights[0]
        for j in range(1, len(weights)):
            total = total + answers[j][i] * weights[j]
        return total
