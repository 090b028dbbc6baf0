"""The scheduler's section of the config: placement profiles (filters,
weighted scorers, picker), the plugins' parameters, saturation and
ejection. Re-exported by scheduler.config, the one config."""

from __future__ import annotations

import msgspec


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ScorerRef(_Section):
    name: str
    # No default: a scorer without a weight is a startup error naming it.
    weight: float | None = None


class ProfileConfig(_Section):
    """filters -> weighted scorers -> picker; plugin names as in scheduler/registry.py."""

    filters: tuple[str, ...] = ("healthy", "serves-model", "not-draining", "not-excluded")
    scorers: tuple[ScorerRef, ...] = ()
    picker: str = "max-score"


class PrefixApproxParams(_Section):
    # A chunk is one KV block of text: the model's block_size_tokens times this
    # many bytes (about 4 for English with common tokenizers), so the index's
    # per-replica bound in blocks holds as many chunks as the replica holds blocks.
    bytes_per_token: float = 4.0
    max_chunks: int = 1_024
    # How long a replica is assumed to keep a prompt it was sent in its cache.
    ttl_s: float = 300.0


class PrefixPreciseParams(_Section):
    # Where a prompt was just sent counts as held there for this long, until
    # the replica's KV events (sent once its prefill is done) confirm it: a
    # burst sharing a new prefix follows the first request instead of spreading.
    # 0: off (each placement is then some 30 µs cheaper).
    pending_ttl_s: float = 10.0


class SessionAffinityParams(_Section):
    max_sessions: int = 100_000


class CostParams(_Section):
    # Blocks are counted in the request's model's block size (models.<name>).
    # Relative price of one uncached prefill block against one block of decode load.
    prefill_weight: float = 1.0


class PluginParams(_Section, rename="kebab"):
    prefix_approx: PrefixApproxParams = PrefixApproxParams()
    prefix_precise: PrefixPreciseParams = PrefixPreciseParams()
    session_affinity: SessionAffinityParams = SessionAffinityParams()
    cost: CostParams = CostParams()


def _default_profile(*scorers: tuple[str, float], picker: str = "max-score") -> ProfileConfig:
    return ProfileConfig(scorers=tuple(ScorerRef(name=n, weight=w) for n, w in scorers),
                         picker=picker)


DEFAULT_PROFILES: dict[str, ProfileConfig] = {
    "least-load": _default_profile(("in-flight-requests", 1.0)),
    "round-robin": _default_profile(picker="round-robin"),
    "prefix-approx": _default_profile(("prefix-approx", 3.0), ("in-flight-requests", 1.0),
                                   ("queue-depth", 1.0)),
    "prefix-precise": _default_profile(("prefix-precise", 3.0), ("in-flight-requests", 1.0),
                                    ("queue-depth", 1.0)),
    # Dynamo's cost, plus the queue a request would wait behind: the cost sees
    # work placed and KV used, not how much prefill is queued ahead (TTFT). At
    # half weight, so a replica that saves the most prefill is not cancelled
    # out by being the one with the longest queue (both are scaled to [0, 1]).
    "cost": _default_profile(("cost", 1.0), ("queue-depth", 0.5)),
}


class SaturationConfig(_Section):
    """When a replica counts as saturated, and the fair queue placements wait
    in while every candidate is (scheduler/saturation.py, waiting_room.py)."""

    # llm-d's detector defaults: a queue of 5 means the batch is full and work
    # piles up; above 80 % KV usage vLLM is close to preempting running requests.
    waiting_requests: int = 5
    kv_cache_usage: float = 0.8
    # The replicas' --max-num-seqs (vLLM's default): requests in flight beyond
    # it are taken as waiting before any load report says so.
    max_num_seqs: int = 256
    # Queued placements per model, and per tenant within it.
    queue_cap_requests: int = 1_000
    tenant_queue_cap_requests: int = 100
    # Retry-After of a placement shed, timed out or refused by the queue.
    retry_after_s: float = 1.0
class EjectionConfig(_Section):
    """A replica an ingress saw fail before the first byte gets no placements
    for base_s × (its recent ejections), at most max_s, and then only after
    its agent reports it healthy again (a replica without an agent: after the
    period alone)."""

    base_s: float = 2.0
    max_s: float = 30.0


class SchedulerConfig(_Section):
    actors: int = 1
    # Prometheus /metrics of scheduler actor i on 127.0.0.1:(metrics_port + i); 0: none.
    metrics_port: int = 9300
    # A placement with no completion notice is forgotten after this long,
    # so a lost notice cannot pin a replica's load forever.
    placement_ttl_s: float = 900.0
    registry_refresh_s: float = 5.0
    # A placement request taken up while more than this many wait behind it in
    # the actor's subscription is refused at once (503 scheduler_overloaded,
    # Retry-After) instead of being placed late; 0: never.
    place_backlog_max: int = 256
    # A replica whose agent has reported before but not for this long is
    # taken as unhealthy (the agent died, or cannot reach it).
    load_stale_s: float = 2.0
    # The profile placing requests; a name under `profiles`.
    profile: str = "least-load"
    # KV capacity assumed of a replica until its agent reports one; bounds its
    # share of the prefix indexes.
    replica_capacity_blocks: int = 4_096
    profiles: dict[str, ProfileConfig] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_PROFILES))
    plugins: PluginParams = PluginParams()
    saturation: SaturationConfig = SaturationConfig()
    ejection: EjectionConfig = EjectionConfig()
