"""The scheduling core: replicas, their load, the indexes and the active profile.

Pure and synchronous; the NATS shell (actors/scheduler.py) feeds it registry
changes, load reports, KV events and completion notices, and asks it to place
requests. Load is counted at decision time (in-flight requests and tokens,
placements since the last report), so a burst spreads before any replica
reports it. Every placement is forgotten after `placement_ttl_s` even if its
completion notice is lost, so the in-flight table stays bounded.

Several cores (one per scheduler actor) stay consistent: each applies the
placements the others broadcast (`apply_peer`) as if it had made them, and
every core hears every completion notice.

The replicas' registry and health (models, healthy, draining) change only
through the methods here, each of which bumps `state_version`: the profile
reuses its filters' output while it stays the same.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scheduler.config import ModelConfig, SchedulerConfig
from scheduler.ejection import Ejections
from scheduler.framework import Decision, ReplicaId, ReplicaView, SchedRequest
from scheduler.kv_events import KVCacheEvent
from scheduler.load_totals import LoadJournal
from scheduler.registry import PluginState, build_profiles
from scheduler.saturation import all_saturated
from scheduler.wire import (
    ModelCard,
    PeerPlaced,
    Placement,
    PlaceRejected,
    PlaceRequest,
    ReplicaInfo,
)

# What a client is told to wait when no replica can take its request now.
NO_CAPACITY_RETRY_AFTER_S = 1.0
# Completion notices remembered, so a peer's placement heard after its request
# was done (the notice overtook it, or a slow peer answered an abandoned
# attempt) is not counted as in flight until the TTL.
DONE_MEMORY_IDS = 65_536

@dataclass(slots=True)
class _InFlight:
    replica_id: ReplicaId
    placed_at_s: float
    tokens: int
    attempt: int


def request_view(req: PlaceRequest, now_s: float) -> SchedRequest:
    """The scheduling view of a placement request."""
    return SchedRequest(request_id=req.request_id, tenant_id=req.tenant_id, model=req.model,
                        now_s=now_s, prompt_tokens=req.prompt_tokens,
                        max_tokens=req.max_tokens, block_hashes=req.block_hashes,
                        chunk_hashes=req.chunk_hashes, session_id=req.session_id,
                        priority=req.priority, exclude=frozenset(req.exclude),
                        attempt=req.attempt)


def peer_placed(actor_id: str, req: PlaceRequest, placement: Placement) -> PeerPlaced:
    """The broadcast telling the other scheduler actors about one placement."""
    return PeerPlaced(actor_id=actor_id, request_id=req.request_id, tenant_id=req.tenant_id,
                      model=req.model, replica_id=placement.replica_id,
                      prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens,
                      block_hashes=req.block_hashes, chunk_hashes=req.chunk_hashes,
                      session_id=req.session_id, attempt=req.attempt)


class SchedulerCore:
    def __init__(self, cfg: SchedulerConfig, rng: random.Random,
                 models: Mapping[str, ModelConfig] | None = None) -> None:
        self.rng = rng
        self.placement_ttl_s = cfg.placement_ttl_s
        self.replica_capacity_blocks = cfg.replica_capacity_blocks
        self.saturation = cfg.saturation
        self.state = PluginState.from_config(cfg, models)
        self.profiles = build_profiles(cfg, self.state)
        self.profile = self.profiles[cfg.profile]
        self.ejections = Ejections(cfg.ejection)
        self.replicas: dict[ReplicaId, ReplicaView] = {}
        # The views of `replicas` as the list every decision starts from.
        self._views: list[ReplicaView] = []
        self.state_version = 0
        # Every change of a replica's load, so the profile updates only those scores.
        self.load_journal = LoadJournal()
        # request id -> placement, oldest first (insertion order == time order).
        self._in_flight: OrderedDict[str, _InFlight] = OrderedDict()
        # Recently done request ids, oldest first (a bounded FIFO).
        self._done_ids: OrderedDict[str, None] = OrderedDict()
        self.last_decision: Decision | None = None

    # --- registry and reports ------------------------------------------------

    def set_replicas(self, infos: list[ReplicaInfo]) -> None:
        """Replaces the registry, keeping load and index entries of replicas that stay."""
        old = self.replicas
        self.replicas = {}
        for info in infos:
            rid = ReplicaId(info.id)
            view = old.get(rid)
            if view is None:
                view = ReplicaView(id=rid, url=info.url, models=info.models,
                                   capacity_blocks=self.replica_capacity_blocks)
            else:
                view.url, view.models = info.url, info.models
            # The operator's flag (`switchyard replicas drain`), also for
            # replicas without an agent.
            view.draining = info.draining
            self.replicas[rid] = view
        self._views = list(self.replicas.values())
        self.state_version += 1
        for rid in old.keys() - self.replicas.keys():
            self.state.drop(rid)
            self.ejections.forget(rid)

    def apply_load(self, replica_id: str, running: int, waiting: int, kv_cache_usage: float,
                   now_s: float, capacity_blocks: int | None = None) -> bool:
        """Takes a load report; False when the replica is not registered."""
        view = self.replicas.get(ReplicaId(replica_id))
        if view is None:
            return False
        view.running, view.waiting, view.kv_cache_usage = running, waiting, kv_cache_usage
        view.load_reported_at_s = now_s
        view.placed_since_report = 0
        self.load_journal.note(view.id)
        if capacity_blocks is not None and capacity_blocks != view.capacity_blocks:
            view.capacity_blocks = capacity_blocks
            self.state.set_capacity(view.id, capacity_blocks)
        return True

    def apply_kv_events(self, replica_id: str, events: Iterable[KVCacheEvent]) -> bool:
        """Applies one replica's KV events in order; False when it is not registered
        (the caller counts the drop; the agent resyncs after registration)."""
        rid = ReplicaId(replica_id)
        if rid not in self.replicas:
            return False
        self.state.precise.apply_events(rid, events)
        return True

    def set_health(self, replica_id: str, *, healthy: bool | None = None,
                   draining: bool | None = None, now_s: float | None = None) -> bool:
        """An ejected replica stays unhealthy until a healthy report at `now_s`
        comes after its ejection period."""
        view = self.replicas.get(ReplicaId(replica_id))
        if view is None:
            return False
        before = (view.healthy, view.draining)
        if healthy is not None:
            if healthy and self.ejections.is_ejected(view.id):
                healthy = now_s is not None and self.ejections.healthy_report(view.id, now_s)
            view.healthy = healthy
        if draining is not None:
            view.draining = draining
        if (view.healthy, view.draining) != before:
            self.state_version += 1
        return True

    def replica_failed(self, replica_id: str, now_s: float) -> float | None:
        """An ingress saw the replica fail: ejects it; returns the period, or
        None when it is unknown, already ejected, or the last replica that
        could serve one of its models (as Envoy caps ejections: one request
        that fails everywhere must not take a whole model down)."""
        view = self.replicas.get(ReplicaId(replica_id))
        if view is None or not all(self._served_without(view, m) for m in view.models):
            return None
        period_s = self.ejections.eject(view.id, now_s)
        if period_s is not None and view.healthy:
            view.healthy = False
            self.state_version += 1
        return period_s

    def mark_stale(self, now_s: float, stale_s: float) -> list[str]:
        """Takes replicas whose agent went quiet as unhealthy; returns their ids.
        Replicas no agent ever reported on are left as they are."""
        stale = [view for view in self.replicas.values()
                 if view.healthy and view.load_reported_at_s is not None
                 and now_s - view.load_reported_at_s > stale_s]
        for view in stale:
            view.healthy = False
        if stale:
            self.state_version += 1
        return [view.id for view in stale]

    def models(self) -> tuple[ModelCard, ...]:
        counts: dict[str, int] = {}
        for view in self.replicas.values():
            for model in view.models:
                counts[model] = counts.get(model, 0) + 1
        return tuple(ModelCard(id=m, replicas=n) for m, n in sorted(counts.items()))

    # --- placement -------------------------------------------------------------

    def place(self, req: PlaceRequest, now_s: float) -> Placement | PlaceRejected:
        return self.place_view(request_view(req, now_s))

    def place_view(self, req: SchedRequest, *,
                   unless_saturated: bool = False) -> Placement | PlaceRejected | None:
        """None: `unless_saturated` and every candidate is saturated; nothing placed."""
        self.expire(req.now_s)
        self._readmit_agentless(req.now_s)
        prior = self._in_flight.get(req.request_id)
        if (prior is not None and prior.replica_id in self.replicas
                and prior.replica_id not in req.exclude):
            # A repeated request (same id) keeps its first decision, unless
            # that replica failed it: then it is decided again without it.
            return self._placement(req.request_id, prior.replica_id)
        if prior is not None:
            self._forget(req.request_id)
        decision = self.profile.decide(req, self._views, self.rng, self.state_version,
                                       self.load_journal)
        self.last_decision = decision
        if decision.chosen is None:
            return self._rejection(req)
        if unless_saturated and all_saturated(
                map(self.replicas.__getitem__, decision.candidates), self.saturation):
            return None
        self._count(req, self.replicas[decision.chosen])
        return self._placement(req.request_id, decision.chosen)

    def apply_peer(self, placed: PeerPlaced, now_s: float) -> bool:
        """Counts a placement another scheduler actor made, and lets the learning
        plugins observe it; False when it is stale (already counted here, done,
        or on a replica not registered here)."""
        self.expire(now_s)
        view = self.replicas.get(ReplicaId(placed.replica_id))
        if view is None or placed.request_id in self._done_ids:
            return False
        prior = self._in_flight.get(placed.request_id)
        if prior is not None:
            if placed.attempt <= prior.attempt:
                return False
            # A retry placed elsewhere after its first replica failed: the load moves.
            self._forget(placed.request_id)
        self._count(SchedRequest(
            request_id=placed.request_id, tenant_id=placed.tenant_id, model=placed.model,
            now_s=now_s, prompt_tokens=placed.prompt_tokens, max_tokens=placed.max_tokens,
            block_hashes=placed.block_hashes, chunk_hashes=placed.chunk_hashes,
            session_id=placed.session_id, attempt=placed.attempt), view)
        return True

    def _count(self, req: SchedRequest, chosen: ReplicaView) -> None:
        tokens = req.prompt_tokens + req.max_tokens
        chosen.in_flight_requests += 1
        chosen.in_flight_tokens += tokens
        chosen.placed_since_report += 1
        self.load_journal.note(chosen.id)
        self._in_flight[req.request_id] = _InFlight(chosen.id, req.now_s, tokens, req.attempt)
        self.profile.observe(req, chosen)

    def explain_last(self) -> dict[str, object] | None:
        """The last decision with each candidate's scores, for a sampled log line."""
        return None if self.last_decision is None else self.last_decision.explain()

    def done(self, request_id: str) -> None:
        """A completion notice: releases the request wherever it was counted.
        Remembered, so a peer's broadcast of it heard later counts nothing."""
        self._forget(request_id)
        done_ids = self._done_ids
        if request_id in done_ids:
            done_ids.move_to_end(request_id)
            return
        done_ids[request_id] = None
        if len(done_ids) > DONE_MEMORY_IDS:
            done_ids.popitem(last=False)

    def _forget(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            self._release(entry)

    def expire(self, now_s: float) -> int:
        """Forgets placements older than the TTL; returns how many."""
        expired = 0
        while self._in_flight:
            request_id, entry = next(iter(self._in_flight.items()))
            if now_s - entry.placed_at_s < self.placement_ttl_s:
                break
            del self._in_flight[request_id]
            self._release(entry)
            expired += 1
        return expired

    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def in_flight_by_replica(self) -> dict[str, int]:
        """Requests counted in flight on each registered replica."""
        return {rid: view.in_flight_requests for rid, view in self.replicas.items()}

    def index_sizes(self) -> dict[str, int]:
        return self.state.index_sizes()

    def _served_without(self, view: ReplicaView, model: str) -> bool:
        return any(other is not view and other.healthy and not other.draining
                   and model in other.models for other in self.replicas.values())

    def _readmit_agentless(self, now_s: float) -> None:
        """Replicas no agent reports on come back when their period is over."""
        for rid in self.ejections.ejected_ids():
            view = self.replicas.get(ReplicaId(rid))
            if (view is not None and view.load_reported_at_s is None
                    and self.ejections.healthy_report(rid, now_s)):
                view.healthy = True
                self.state_version += 1

    def _release(self, entry: _InFlight) -> None:
        view = self.replicas.get(entry.replica_id)
        if view is not None:
            if view.in_flight_requests > 0:
                view.in_flight_requests -= 1
            view.in_flight_tokens = max(0, view.in_flight_tokens - entry.tokens)
            self.load_journal.note(view.id)

    def _rejection(self, req: SchedRequest) -> PlaceRejected:
        if not any(req.model in view.models for view in self.replicas.values()):
            return PlaceRejected(request_id=req.request_id, code="model_not_found",
                                 message=f"The model `{req.model}` does not exist.")
        return PlaceRejected(request_id=req.request_id, code="no_capacity",
                             message=f"No replica of `{req.model}` can take the request now.",
                             retry_after_s=NO_CAPACITY_RETRY_AFTER_S)

    def _placement(self, request_id: str, replica_id: ReplicaId) -> Placement:
        return Placement(request_id=request_id, replica_id=replica_id,
                         url=self.replicas[replica_id].url)
