"""The one registry of scheduling plugins: kebab-case name -> factory.

Filled here and nowhere else. Building a profile from config looks every name
up; an unknown name, a scorer without a weight or a weight that is not a
positive number is a ConfigError naming it, never a silent fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from scheduler.approx_index import ApproxIndex, MarkIndex
from scheduler.config import ModelConfig, PluginParams, ProfileConfig, SchedulerConfig
from scheduler.errors import ConfigError
from scheduler.filters import Healthy, NotDraining, NotExcluded, ServesModel
from scheduler.framework import Filter, Picker, Profile, ReplicaId, Scorer, WeightedScorer
from scheduler.pickers import MaxScore, RoundRobin, WeightedRandom
from scheduler.prefix_index import PrefixIndex
from scheduler.scorers import (
    Cost,
    InFlightRequests,
    InFlightTokens,
    KvCacheUsage,
    PreciseHoldings,
    PrefixApprox,
    PrefixPrecise,
    QueueDepth,
    SessionAffinity,
    SessionTable,
)


@dataclass(frozen=True, slots=True)
class PluginState:
    """The state plugins share with the core: indexes fed by events and decisions."""

    precise: PrefixIndex
    # Prompts (block hashes) sent to a replica whose KV events have not come yet.
    pending: MarkIndex | None
    approx: ApproxIndex
    sessions: SessionTable
    params: PluginParams
    # Served model -> its engine settings (block size, for the cost scorer).
    models: Mapping[str, ModelConfig]

    @classmethod
    def from_config(cls, cfg: SchedulerConfig,
                    models: Mapping[str, ModelConfig] | None = None) -> PluginState:
        params = cfg.plugins
        return cls(
            precise=PrefixIndex(cfg.replica_capacity_blocks),
            pending=(MarkIndex(cfg.replica_capacity_blocks, params.prefix_precise.pending_ttl_s)
                     if params.prefix_precise.pending_ttl_s > 0 else None),
            approx=ApproxIndex(cfg.replica_capacity_blocks, params.prefix_approx.ttl_s),
            sessions=SessionTable(params.session_affinity.max_sessions),
            params=params,
            models=models or {},
        )

    def drop(self, replica_id: ReplicaId) -> None:
        """Forgets a replica that left the registry, in every index."""
        for index in self._indexes():
            index.drop(replica_id)

    def set_capacity(self, replica_id: ReplicaId, capacity_blocks: int) -> None:
        """The replica's KV capacity as it reported it: every index's bound for it."""
        for index in self._indexes():
            index.set_capacity(replica_id, capacity_blocks)

    def _indexes(self) -> tuple[PrefixIndex | ApproxIndex, ...]:
        return tuple(i for i in (self.precise, self.pending, self.approx) if i is not None)

    def index_sizes(self) -> dict[str, int]:
        """Entries per index (the scheduler actor reports them in its stats)."""
        return {"prefix-precise": self.precise.size_blocks(),
                "prefix-precise-pending": self.pending.size_blocks() if self.pending else 0,
                "prefix-approx": self.approx.size_blocks(),
                "session-affinity": len(self.sessions)}


FILTERS: dict[str, Callable[[PluginState], Filter]] = {
    "healthy": lambda state: Healthy(),
    "serves-model": lambda state: ServesModel(),
    "not-draining": lambda state: NotDraining(),
    "not-excluded": lambda state: NotExcluded(),
}

SCORERS: dict[str, Callable[[PluginState], Scorer]] = {
    "in-flight-requests": lambda state: InFlightRequests(),
    "in-flight-tokens": lambda state: InFlightTokens(),
    "queue-depth": lambda state: QueueDepth(),
    "kv-cache-usage": lambda state: KvCacheUsage(),
    "session-affinity": lambda state: SessionAffinity(state.sessions),
    "prefix-precise": lambda state: PrefixPrecise(PreciseHoldings(state.precise, state.pending),
                                                  PrefixApprox(state.approx)),
    "prefix-approx": lambda state: PrefixApprox(state.approx),
    "cost": lambda state: Cost(PreciseHoldings(state.precise, state.pending), state.approx,
                               state.params.cost, state.models),
}

PICKERS: dict[str, Callable[[PluginState], Picker]] = {
    "max-score": lambda state: MaxScore(),
    "weighted-random": lambda state: WeightedRandom(),
    "round-robin": lambda state: RoundRobin(),
}


def build_profile(name: str, cfg: ProfileConfig, state: PluginState) -> Profile:
    where = f"scheduler profile `{name}`"
    filters = [_lookup(FILTERS, "filter", f, where)(state) for f in cfg.filters]
    scorers = []
    for ref in cfg.scorers:
        factory = _lookup(SCORERS, "scorer", ref.name, where)
        if ref.weight is None:
            raise ConfigError(f"{where}: scorer `{ref.name}` has no weight")
        if not (math.isfinite(ref.weight) and ref.weight > 0):
            raise ConfigError(f"{where}: scorer `{ref.name}` needs a positive weight, "
                              f"not {ref.weight}")
        scorers.append(WeightedScorer(factory(state), ref.weight))
    picker = _lookup(PICKERS, "picker", cfg.picker, where)(state)
    return Profile(name, filters, scorers, picker)


def build_profiles(cfg: SchedulerConfig, state: PluginState) -> dict[str, Profile]:
    """Every configured profile, so a mistake in one not in use still stops startup."""
    if cfg.profile not in cfg.profiles:
        raise ConfigError(f"scheduler profile `{cfg.profile}` is not defined; "
                          f"defined: {', '.join(sorted(cfg.profiles))}")
    return {name: build_profile(name, p, state) for name, p in cfg.profiles.items()}


T = TypeVar("T")


def _lookup(table: dict[str, T], kind: str, name: str, where: str) -> T:
    if name not in table:
        raise ConfigError(f"{where}: unknown {kind} `{name}`; known: {', '.join(sorted(table))}")
    return table[name]
