"""Built-in filters: which replicas may take a request at all.

Plain comprehensions are the fastest form in 3.11. Those that read only the
request's model and the replicas' registry and health say so
(`by_model_and_health`): the profile runs them once per model and state.
"""

from __future__ import annotations

from scheduler.framework import ReplicaView, SchedRequest


class Healthy:
    """Keeps replicas whose last health check passed."""

    name = "healthy"
    by_model_and_health = True

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return [r for r in replicas if r.healthy]


class ServesModel:
    """Keeps replicas that serve the requested model."""

    name = "serves-model"
    by_model_and_health = True

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        model = req.model
        return [r for r in replicas if model in r.models]


class NotDraining:
    """Keeps replicas not being drained (they finish their work but take no more)."""

    name = "not-draining"
    by_model_and_health = True

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        return [r for r in replicas if not r.draining]


class NotExcluded:
    """Drops the replicas that already failed this request (its retry goes elsewhere)."""

    name = "not-excluded"

    def filter(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[ReplicaView]:
        if not req.exclude:
            return replicas
        return [r for r in replicas if r.id not in req.exclude]
