"""The scheduling core: replicas, their load, the indexes and the active profile.

Pure and synchronous; the NATS shell (actors/scheduler.py) feeds it registry
changes, load reports, KV events and completion notices, and asks it to place
requests. Load is counted at decision time (in-flight requests and tokens,
placements since the last report), so a burst spreads before any replica
reports it. Every placement is forgotten after `placement_ttl_s` even if its
completion notice is lost, so the in-flight table stays bounded.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scheduler.config import ModelConfig, SchedulerConfig
from scheduler.framework import Decision, ReplicaId, ReplicaView, SchedRequest
from scheduler.kv_events import KVCacheEvent
from scheduler.registry import PluginState, build_profiles
from scheduler.wire import ModelCard, Placement, PlaceRejected, PlaceRequest, ReplicaInfo

# What a client is told to wait when no replica can take its request now.
NO_CAPACITY_RETRY_AFTER_S = 1.0

@dataclass(slots=True)
class _InFlight:
    replica_id: ReplicaId
    placed_at_s: float
    tokens: int


def request_view(req: PlaceRequest, now_s: float) -> SchedRequest:
    """The scheduling view of a placement request."""
    return SchedRequest(request_id=req.request_id, tenant_id=req.tenant_id, model=req.model,
                        now_s=now_s, prompt_tokens=req.prompt_tokens,
                        max_tokens=req.max_tokens, block_hashes=req.block_hashes,
                        chunk_hashes=req.chunk_hashes, session_id=req.session_id,
                        priority=req.priority, exclude=frozenset(req.exclude))


class SchedulerCore:
    def __init__(self, cfg: SchedulerConfig, rng: random.Random,
                 models: Mapping[str, ModelConfig] | None = None) -> None:
        self.rng = rng
        self.placement_ttl_s = cfg.placement_ttl_s
        self.replica_capacity_blocks = cfg.replica_capacity_blocks
        self.state = PluginState.from_config(cfg, models)
        self.profiles = build_profiles(cfg, self.state)
        self.profile = self.profiles[cfg.profile]
        self.replicas: dict[ReplicaId, ReplicaView] = {}
        # request id -> placement, oldest first (insertion order == time order).
        self._in_flight: OrderedDict[str, _InFlight] = OrderedDict()
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
        for rid in old.keys() - self.replicas.keys():
            self.state.precise.drop(rid)
            self.state.approx.drop(rid)

    def apply_load(self, replica_id: str, running: int, waiting: int, kv_cache_usage: float,
                   now_s: float, capacity_blocks: int | None = None) -> bool:
        """Takes a load report; False when the replica is not registered."""
        view = self.replicas.get(ReplicaId(replica_id))
        if view is None:
            return False
        view.running, view.waiting, view.kv_cache_usage = running, waiting, kv_cache_usage
        view.load_reported_at_s = now_s
        view.placed_since_report = 0
        if capacity_blocks is not None and capacity_blocks != view.capacity_blocks:
            view.capacity_blocks = capacity_blocks
            self.state.precise.set_capacity(view.id, capacity_blocks)
            self.state.approx.set_capacity(view.id, capacity_blocks)
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
                   draining: bool | None = None) -> bool:
        view = self.replicas.get(ReplicaId(replica_id))
        if view is None:
            return False
        if healthy is not None:
            view.healthy = healthy
        if draining is not None:
            view.draining = draining
        return True

    def mark_stale(self, now_s: float, stale_s: float) -> list[str]:
        """Takes replicas whose agent went quiet as unhealthy; returns their ids.
        Replicas no agent ever reported on are left as they are."""
        stale = [view for view in self.replicas.values()
                 if view.healthy and view.load_reported_at_s is not None
                 and now_s - view.load_reported_at_s > stale_s]
        for view in stale:
            view.healthy = False
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

    def place_view(self, req: SchedRequest) -> Placement | PlaceRejected:
        self.expire(req.now_s)
        prior = self._in_flight.get(req.request_id)
        if prior is not None and prior.replica_id in self.replicas:
            # A retried request (same id) keeps its first decision.
            return self._placement(req.request_id, prior.replica_id)
        if prior is not None:
            self.done(req.request_id)
        decision = self.profile.decide(req, list(self.replicas.values()), self.rng)
        self.last_decision = decision
        if decision.chosen is None:
            return self._rejection(req)
        chosen = self.replicas[decision.chosen]
        tokens = req.prompt_tokens + req.max_tokens
        chosen.in_flight_requests += 1
        chosen.in_flight_tokens += tokens
        chosen.placed_since_report += 1
        self._in_flight[req.request_id] = _InFlight(chosen.id, req.now_s, tokens)
        self.profile.observe(req, chosen)
        return self._placement(req.request_id, chosen.id)

    def explain_last(self) -> dict[str, object] | None:
        """The last decision with each candidate's scores, for a sampled log line."""
        return None if self.last_decision is None else self.last_decision.explain()

    def done(self, request_id: str) -> None:
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

    def index_sizes(self) -> dict[str, int]:
        return self.state.index_sizes()

    def _release(self, entry: _InFlight) -> None:
        view = self.replicas.get(entry.replica_id)
        if view is not None:
            view.in_flight_requests = max(0, view.in_flight_requests - 1)
            view.in_flight_tokens = max(0, view.in_flight_tokens - entry.tokens)

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
