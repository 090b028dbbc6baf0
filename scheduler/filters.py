"""Built-in filters: which replicas may take a request at all.

They run on every decision: plain comprehensions are the fastest form in 3.11.
"""

from __future__ import annotations

from scheduler.framework import ReplicaView, SchedRequest


class Healthy:
    """Keeps replicas whose last health check passed."""

    name = "healthy"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return [r for r in replicas if r.healthy]


class ServesModel:
    """Keeps replicas that serve the requested model."""

    name = "serves-model"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        model = req.model
        return [r for r in replicas if model in r.models]


class NotDraining:
    """Keeps replicas not being drained (they finish their work but take no more)."""

    name = "not-draining"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return [r for r in replicas if not r.draining]


class NotExcluded:
    """Drops the replicas that already failed this request (its retry goes elsewhere)."""

    name = "not-excluded"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        if not req.exclude:
            return replicas
        return [r for r in replicas if r.id not in req.exclude]
