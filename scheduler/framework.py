"""The shapes of scheduling plugins (llm-d's): filters -> weighted scorers -> picker.

Every plugin is synchronous and pure: its output depends only on its inputs,
the decision time carried by the request view (`now_s`) and the random source
handed to pickers. Plugins that learn from decisions (approximate prefixes,
session affinity) implement `DecisionObserver`; the profile tells them which
replica was chosen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NewType, Protocol, runtime_checkable

ReplicaId = NewType("ReplicaId", str)
Scores = dict[ReplicaId, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedRequest:
    """What scheduling knows of one request, at decision time `now_s`."""

    request_id: str
    tenant_id: str
    model: str
    now_s: float
    prompt_tokens: int = 0
    max_tokens: int = 0
    # vLLM block hashes of the prompt's full blocks (low 64 bits), when ingress
    # tokenized it (precise mode); empty otherwise.
    block_hashes: tuple[int, ...] = ()
    # Chained hashes of the prompt's chunks (approx_index.chunk_hashes).
    chunk_hashes: tuple[int, ...] = ()
    # `x-session-id` header or the OpenAI `user` field; empty: none.
    session_id: str = ""
    # Higher first under saturation; negative: sheddable.
    priority: int = 0
    # Replicas that already failed this request, and which attempt this is.
    exclude: frozenset[str] = frozenset()
    attempt: int = 1


@dataclass(slots=True, kw_only=True)
class ReplicaView:
    """One replica as plugins see it: registry facts plus load.

    `running`, `waiting` and `kv_cache_usage` come from the replica's last load
    report; `in_flight_requests`/`in_flight_tokens` are counted here at decision
    time, and `placed_since_report` counts placements the last report cannot
    have seen yet, so a burst spreads before any report arrives.
    """

    id: ReplicaId
    url: str
    models: tuple[str, ...]
    capacity_blocks: int
    healthy: bool = True
    draining: bool = False
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    load_reported_at_s: float | None = None
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    placed_since_report: int = 0


class Filter(Protocol):
    name: str

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]: ...


class Scorer(Protocol):
    name: str

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> Scores:
        """A score in [0, 1] per replica of `replicas`, higher is better; a
        replica left out scores 0 (as a missing key reads in llm-d's Go maps),
        so a scorer that favours a few replicas answers for those few only."""
        ...


class Picker(Protocol):
    name: str

    def pick(self, req: SchedRequest, scores: Scores, rng: random.Random) -> ReplicaId: ...


@runtime_checkable
class DecisionObserver(Protocol):
    def placed(self, req: SchedRequest, replica: ReplicaView) -> None: ...


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class Decision:
    """One decision with everything needed to explain it."""

    profile: str
    request_id: str
    chosen: ReplicaId | None
    candidates: list[ReplicaId]
    per_scorer: dict[str, Scores] = field(default_factory=dict)
    totals: Scores = field(default_factory=dict)
    filtered_out: dict[str, list[ReplicaId]] = field(default_factory=dict)

    def explain(self) -> dict[str, object]:
        """A structured record for a sampled log line: each candidate's scores."""
        candidates = {
            rid: {"total": round(self.totals.get(rid, 0.0), 6),
                  "scores": {name: round(s.get(rid, 0.0), 6)
                             for name, s in self.per_scorer.items()}}
            for rid in self.candidates
        }
        return {"profile": self.profile, "request_id": self.request_id,
                "chosen": self.chosen, "candidates": candidates,
                "filtered_out": self.filtered_out}


@dataclass(frozen=True, slots=True)
class Profile:
    """filters -> weighted scorers -> picker, as configured under one name."""

    name: str
    filters: Sequence[Filter]
    scorers: Sequence[WeightedScorer]
    picker: Picker
    # Found once here: a runtime protocol check per decision would cost microseconds.
    observers: tuple[DecisionObserver, ...] = field(init=False)

    def __post_init__(self) -> None:
        plugins = (*self.filters, *(w.scorer for w in self.scorers), self.picker)
        object.__setattr__(self, "observers",
                           tuple(p for p in plugins if isinstance(p, DecisionObserver)))

    def decide(self, req: SchedRequest, replicas: list[ReplicaView],
               rng: random.Random) -> Decision:
        decision = Decision(self.name, req.request_id, None, [])
        for f in self.filters:
            kept = f.filter(req, replicas)
            if len(kept) != len(replicas):
                kept_ids = {r.id for r in kept}
                decision.filtered_out[f.name] = [r.id for r in replicas if r.id not in kept_ids]
            replicas = kept
        decision.candidates = [r.id for r in replicas]
        if not replicas:
            return decision
        totals = self._weighted_totals(req, replicas, decision)
        decision.totals = totals
        decision.chosen = self.picker.pick(req, totals, rng)
        return decision

    def _weighted_totals(self, req: SchedRequest, replicas: list[ReplicaView],
                         decision: Decision) -> Scores:
        ids = decision.candidates
        acc: list[float] | None = None
        sparse: list[tuple[Scores, float]] = []
        for weighted in self.scorers:
            scores = weighted.scorer.score(req, replicas)
            decision.per_scorer[weighted.scorer.name] = scores
            weight = weighted.weight
            # Load scorers answer for every candidate in candidate order: summed
            # as lists; sparse answers (prefix scorers) are added per entry after.
            if len(scores) != len(ids) or list(scores) != ids:
                sparse.append((scores, weight))
            elif acc is None:
                acc = list(scores.values()) if weight == 1.0 else [
                    s * weight for s in scores.values()]
            else:
                acc = [a + s * weight for a, s in zip(acc, scores.values(), strict=True)]
        totals = dict.fromkeys(ids, 0.0) if acc is None else dict(zip(ids, acc, strict=True))
        for scores, weight in sparse:
            for rid, score in scores.items():
                totals[rid] += score * weight
        return totals

    def observe(self, req: SchedRequest, replica: ReplicaView) -> None:
        """Tells the plugins that learn from decisions where `req` went."""
        for observer in self.observers:
            observer.placed(req, replica)
