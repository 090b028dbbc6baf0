"""The shapes of scheduling plugins (llm-d's): filters -> weighted scorers -> picker.

Every plugin is synchronous and pure: its output depends only on its inputs,
the decision time carried by the request view (`now_s`) and the random source
handed to pickers. Plugins that learn from decisions (approximate prefixes,
session affinity) implement `DecisionObserver`; the profile tells them which
replica was chosen.

A decision runs on every request, so scores travel as plain lists aligned with
the candidates: a load scorer answers one float per candidate, a prefix scorer
a dict of the few replicas it favours, and the profile adds them up as lists.
Load scorers (`load_totals.LoadScorer`) read one replica at a time, so given
the core's journal of load changes the profile keeps their answers and
totals per candidate list and updates the changed replicas only; a decision
adds the few holders' sparse scores to a copy of those totals.
The per-candidate explanation is built from what the decision kept, only when
a sampled log line asks for it. Filters whose output depends only on the
request's model and the replicas' registry and health are run once per model
and state version (the core counts its changes), not per request.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import add
from typing import NewType, Protocol, runtime_checkable

from scheduler.load_totals import LoadJournal, LoadScorer, LoadTotals

ReplicaId = NewType("ReplicaId", str)
Scores = dict[ReplicaId, float]
# A scorer's answer: one score per candidate, in candidate order (dense), or
# the few replicas it favours (sparse; a replica left out scores 0).
Answer = list[float] | Scores
# Filtered-out results kept per model and state version; beyond this many
# models (requests naming unknown ones) the cache starts over.
MAX_CACHED_MODELS = 256


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
    """Keeps the replicas that may take the request, in their given order.

    A filter whose output depends only on the request's model and the
    replicas' `models`, `healthy` and `draining` sets `by_model_and_health =
    True`; the profile then reuses its output while the state is unchanged.
    """

    name: str

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]: ...


class Scorer(Protocol):
    name: str

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> Answer:
        """Scores in [0, 1], higher is better: a list aligned with `replicas`,
        or a dict of the replicas the scorer favours (one left out scores 0,
        as a missing key reads in llm-d's Go maps; one not among `replicas`
        is ignored), so a prefix scorer's cost stays with the few holders."""
        ...


class Picker(Protocol):
    name: str

    def pick(self, req: SchedRequest, candidates: list[ReplicaId], totals: list[float],
             rng: random.Random) -> ReplicaId:
        """One of `candidates` (never empty), given their weighted totals in the same order."""
        ...


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
    # Filter name -> the replicas it removed; may be shared between decisions.
    filtered_out: dict[str, list[ReplicaId]] = field(default_factory=dict)
    scorer_names: tuple[str, ...] = ()
    # Each scorer's answer, in `scorer_names` order, and the weighted totals
    # aligned with `candidates`.
    answers: list[Answer] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)

    def explain(self) -> dict[str, object]:
        """A structured record for a sampled log line: each candidate's scores."""
        per_scorer = [dict(zip(self.candidates, answer, strict=True))
                      if isinstance(answer, list) else answer for answer in self.answers]
        candidates = {
            rid: {"total": round(total, 6),
                  "scores": {name: round(scores.get(rid, 0.0), 6)
                             for name, scores in zip(self.scorer_names, per_scorer, strict=True)}}
            for rid, total in zip(self.candidates, self.totals, strict=True)
        }
        return {"profile": self.profile, "request_id": self.request_id,
                "chosen": self.chosen, "candidates": candidates,
                "filtered_out": self.filtered_out}


@dataclass(frozen=True, slots=True)
class _Kept:
    """Replicas kept by filters, their ids, each id's position, and what was removed."""

    replicas: list[ReplicaView]
    ids: list[ReplicaId]
    position: dict[ReplicaId, int]
    filtered_out: dict[str, list[ReplicaId]]

    @classmethod
    def of(cls, replicas: list[ReplicaView], filtered_out: dict[str, list[ReplicaId]]) -> _Kept:
        ids = [r.id for r in replicas]
        return cls(replicas, ids, {rid: i for i, rid in enumerate(ids)}, filtered_out)


@dataclass(slots=True)
class _FilterCache:
    """Per model: what the state-only filters keep; valid for one state version."""

    version: int | None = None
    by_model: dict[str, _Kept] = field(default_factory=dict)
    # The load scorers' answers for each cached candidate list.
    load_by_model: dict[str, LoadTotals] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Profile:
    """filters -> weighted scorers -> picker, as configured under one name."""

    name: str
    filters: Sequence[Filter]
    scorers: Sequence[WeightedScorer]
    picker: Picker
    # Found once here: a runtime protocol check per decision would cost microseconds.
    observers: tuple[DecisionObserver, ...] = field(init=False)
    scorer_names: tuple[str, ...] = field(init=False)
    # The leading filters that depend on the state only, and the rest.
    _state_filters: tuple[Filter, ...] = field(init=False)
    _request_filters: tuple[Filter, ...] = field(init=False)
    _cache: _FilterCache = field(init=False)
    # The scorers whose answers a LoadTotals keeps, and the others with their places.
    _load_scorers: tuple[WeightedScorer, ...] = field(init=False)
    _other_scorers: tuple[tuple[int, WeightedScorer], ...] = field(init=False)

    def __post_init__(self) -> None:
        plugins = (*self.filters, *(w.scorer for w in self.scorers), self.picker)
        leading = 0
        while (leading < len(self.filters)
               and getattr(self.filters[leading], "by_model_and_health", False)):
            leading += 1
        for name, value in (
                ("observers", tuple(p for p in plugins if isinstance(p, DecisionObserver))),
                ("scorer_names", tuple(w.scorer.name for w in self.scorers)),
                ("_state_filters", tuple(self.filters[:leading])),
                ("_request_filters", tuple(self.filters[leading:])),
                ("_cache", _FilterCache()),
                ("_load_scorers", tuple(w for w in self.scorers
                                        if isinstance(w.scorer, LoadScorer))),
                ("_other_scorers", tuple((k, w) for k, w in enumerate(self.scorers)
                                         if not isinstance(w.scorer, LoadScorer)))):
            object.__setattr__(self, name, value)

    def decide(self, req: SchedRequest, replicas: list[ReplicaView], rng: random.Random,
               state_version: int | None = None, journal: LoadJournal | None = None) -> Decision:
        """`state_version` names the state of `replicas` (the same list, whose
        models, health and draining flags change only with the version), so
        the state-only filters' output can be reused; None: run them all.
        `journal` lists every replica whose load changed since the last call;
        with it, load scores are kept between decisions instead of recomputed."""
        kept = cached = self._state_filtered(req, replicas, state_version)
        for f in self._request_filters:
            narrowed = f.filter(req, kept.replicas)
            if len(narrowed) != len(kept.replicas):
                kept = _Kept.of(narrowed, {**kept.filtered_out,
                                           f.name: _removed(kept.replicas, narrowed)})
        decision = Decision(self.name, req.request_id, None, kept.ids, kept.filtered_out,
                            self.scorer_names)
        if kept.ids:
            if journal is not None and state_version is not None and kept is cached:
                decision.totals = self._kept_totals(req, kept, journal, decision.answers)
            else:
                decision.totals = self._weighted_totals(req, kept, [
                    w.scorer.score(req, kept.replicas) for w in self.scorers], decision.answers)
            decision.chosen = self.picker.pick(req, kept.ids, decision.totals, rng)
        return decision

    def _state_filtered(self, req: SchedRequest, replicas: list[ReplicaView],
                        state_version: int | None) -> _Kept:
        cache = self._cache
        if state_version is not None:
            if cache.version != state_version or len(cache.by_model) >= MAX_CACHED_MODELS:
                cache.version = state_version
                cache.by_model.clear()
                cache.load_by_model.clear()
            hit = cache.by_model.get(req.model)
            if hit is not None:
                return hit
        filtered_out: dict[str, list[ReplicaId]] = {}
        for f in self._state_filters:
            narrowed = f.filter(req, replicas)
            if len(narrowed) != len(replicas):
                filtered_out[f.name] = _removed(replicas, narrowed)
            replicas = narrowed
        kept = _Kept.of(replicas, filtered_out)
        if state_version is not None:
            cache.by_model[req.model] = kept
        return kept

    def _kept_totals(self, req: SchedRequest, kept: _Kept, journal: LoadJournal,
                     answers: list[Answer]) -> list[float]:
        """The totals with the load scorers' answers kept current by `journal`."""
        replicas = kept.replicas
        if not self._load_scorers:
            return self._weighted_totals(req, kept, [
                w.scorer.score(req, replicas) for w in self.scorers], answers)
        load = self._cache.load_by_model.get(req.model)
        if load is None:
            load = self._cache.load_by_model[req.model] = LoadTotals(
                req.model, replicas, kept.position,
                [(w.scorer, w.weight) for w in self._load_scorers], journal)
        own, totals = load.answers(req)
        if not self._other_scorers:
            answers += own
            return totals
        others = [(k, w.weight, w.scorer.score(req, replicas)) for k, w in self._other_scorers]
        dense = False
        for k, _, answer in others:
            own.insert(k, answer)
            dense = dense or isinstance(answer, list)
        if dense:
            # Another dense answer: the sum must add them all in profile order.
            return self._weighted_totals(req, kept, own, answers)
        answers += own
        position = kept.position.get
        for _, weight, answer in others:
            for rid, score in answer.items():
                i = position(rid)
                if i is not None:
                    totals[i] += score * weight
        return totals

    def _weighted_totals(self, req: SchedRequest, kept: _Kept, own: list[Answer],
                         answers: list[Answer]) -> list[float]:
        """The weighted sum of the scorers' answers `own` (kept in `answers`)."""
        replicas = kept.replicas
        totals: list[float] | None = None
        for weighted, answer in zip(self.scorers, own, strict=True):
            answers.append(answer)
            weight = weighted.weight
            if not isinstance(answer, list):
                continue
            if len(answer) != len(replicas):
                raise ValueError(f"scorer `{weighted.scorer.name}` answered {len(answer)} "
                                 f"scores for {len(replicas)} candidates")
            if totals is None:
                # A fresh list either way: the answers are kept for explain().
                totals = answer[:] if weight == 1.0 else [s * weight for s in answer]
            elif weight == 1.0:
                totals = list(map(add, totals, answer))
            else:
                totals = [t + s * weight for t, s in zip(totals, answer, strict=True)]
        if totals is None:
            totals = [0.0] * len(replicas)
        self._add_sparse(kept, own, totals)
        return totals

    def _add_sparse(self, kept: _Kept, own: list[Answer], totals: list[float]) -> None:
        position = kept.position.get
        for weighted, answer in zip(self.scorers, own, strict=True):
            if answer and not isinstance(answer, list):
                weight = weighted.weight
                for rid, score in answer.items():
                    i = position(rid)
                    if i is not None:
                        totals[i] += score * weight

    def observe(self, req: SchedRequest, replica: ReplicaView) -> None:
        """Tells the plugins that learn from decisions where `req` went."""
        for observer in self.observers:
            observer.placed(req, replica)


def _removed(before: list[ReplicaView], after: list[ReplicaView]) -> list[ReplicaId]:
    kept_ids = {r.id for r in after}
    return [r.id for r in before if r.id not in kept_ids]
