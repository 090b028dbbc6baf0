"""Placement core: picks the replica with the fewest in-flight requests.

Pure and synchronous. Load is counted at decision time (so a burst spreads
before any replica reports it) and ties are broken at random (injected rng).
Every placement is forgotten after `placement_ttl_s` even if its completion
notice is lost, so the in-flight table stays bounded.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

from scheduler.wire import (
    ModelCard,
    Placement,
    PlaceRejected,
    PlaceRequest,
    ReplicaInfo,
)


@dataclass
class _InFlight:
    replica_id: str
    placed_at_s: float


@dataclass
class ReplicaLoad:
    info: ReplicaInfo
    in_flight: int = 0


@dataclass
class PlacementTable:
    rng: random.Random
    placement_ttl_s: float
    replicas: dict[str, ReplicaLoad] = field(default_factory=dict)
    # request id -> placement, oldest first (insertion order == time order).
    _in_flight: OrderedDict[str, _InFlight] = field(default_factory=OrderedDict)

    def set_replicas(self, infos: list[ReplicaInfo]) -> None:
        """Replaces the registry, keeping the load of replicas that stay."""
        old = self.replicas
        self.replicas = {
            info.id: ReplicaLoad(info, old[info.id].in_flight if info.id in old else 0)
            for info in infos
        }

    def models(self) -> tuple[ModelCard, ...]:
        counts: dict[str, int] = {}
        for load in self.replicas.values():
            for model in load.info.models:
                counts[model] = counts.get(model, 0) + 1
        return tuple(ModelCard(id=m, replicas=n) for m, n in sorted(counts.items()))

    def place(self, req: PlaceRequest, now_s: float) -> Placement | PlaceRejected:
        self.expire(now_s)
        prior = self._in_flight.get(req.request_id)
        if prior is not None and prior.replica_id in self.replicas:
            # A retried request (same id) keeps its first decision.
            return self._placement(req.request_id, prior.replica_id)
        if prior is not None:
            self.done(req.request_id)
        candidates = [r for r in self.replicas.values() if req.model in r.info.models]
        if not candidates:
            return PlaceRejected(request_id=req.request_id, code="model_not_found",
                                 message=f"The model `{req.model}` does not exist.")
        fewest = min(r.in_flight for r in candidates)
        chosen = self.rng.choice([r for r in candidates if r.in_flight == fewest])
        chosen.in_flight += 1
        self._in_flight[req.request_id] = _InFlight(chosen.info.id, now_s)
        return self._placement(req.request_id, chosen.info.id)

    def done(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            self._release(entry.replica_id)

    def expire(self, now_s: float) -> int:
        """Forgets placements older than the TTL; returns how many."""
        expired = 0
        while self._in_flight:
            request_id, entry = next(iter(self._in_flight.items()))
            if now_s - entry.placed_at_s < self.placement_ttl_s:
                break
            del self._in_flight[request_id]
            self._release(entry.replica_id)
            expired += 1
        return expired

    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def _release(self, replica_id: str) -> None:
        load = self.replicas.get(replica_id)
        if load is not None and load.in_flight > 0:
            load.in_flight -= 1

    def _placement(self, request_id: str, replica_id: str) -> Placement:
        return Placement(request_id=request_id, replica_id=replica_id,
                         url=self.replicas[replica_id].info.url)
