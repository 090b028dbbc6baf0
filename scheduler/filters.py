"""Built-in filters: which replicas may take a request at all."""

from __future__ import annotations

from itertools import compress, repeat
from operator import attrgetter, contains, not_

from scheduler.framework import ReplicaView, SchedRequest

# attrgetter and compress keep these per-replica loops in C: filters run on every decision.
_HEALTHY = attrgetter("healthy")
_MODELS = attrgetter("models")
_DRAINING = attrgetter("draining")


class Healthy:
    """Keeps replicas whose last health check passed."""

    name = "healthy"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return list(compress(replicas, map(_HEALTHY, replicas)))


class ServesModel:
    """Keeps replicas that serve the requested model."""

    name = "serves-model"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return list(compress(replicas, map(contains, map(_MODELS, replicas), repeat(req.model))))


class NotDraining:
    """Keeps replicas not being drained (they finish their work but take no more)."""

    name = "not-draining"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return list(compress(replicas, map(not_, map(_DRAINING, replicas))))


class NotExcluded:
    """Drops the replicas that already failed this request (its retry goes elsewhere)."""

    name = "not-excluded"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        if not req.exclude:
            return replicas
        return [r for r in replicas if r.id not in req.exclude]
