"""Prometheus metrics of one ingress process (its own registry, so tests can
run several ingresses in one process). The workers of one port share a
directory instead (prometheus_client's multiprocess mode, router/workers.py):
each writes its own files, and every worker's /metrics sums them all."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FAST_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)
# Switchyard's own time per request: fine from 0.1 to 5 ms, coarse beyond.
OVERHEAD_BUCKETS_S = (0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003,
                      0.005, 0.01, 0.025, 0.1, 1)

_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        """`multiprocess_dir`: the workers' shared directory (the process's
        environment must name it before prometheus_client is imported)."""
        self.registry = CollectorRegistry()
        self._exposed = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}
        if multiprocess_dir is not None:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, str(multiprocess_dir))
        r = self.registry
        self.requests = Counter(
            "switchyard_http_requests", "Requests answered, by route and status.",
            ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "switchyard_http_request_duration_seconds", "Whole request time, by route.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.overhead = Histogram(
            "switchyard_overhead_seconds", "Switchyard's own time per request until its "
            "response headers (x-switchyard-overhead-ms): the request's time so far minus "
            "the time spent waiting for replicas; stream: until the first event.",
            ["route", "stream"], buckets=OVERHEAD_BUCKETS_S, registry=r)
        self.ttft = Histogram(
            "switchyard_ttft_seconds", "Time to first token seen by the client.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.placement = Histogram(
            "switchyard_placement_duration_seconds", "Placement round trip over NATS.",
            buckets=FAST_BUCKETS_S, registry=r)
        self.placement_retries = Counter(
            "switchyard_placement_retries", "Placements sent again: a scheduler actor did "
            "not answer in time, or none was serving.", registry=r)
        self.placement_fallbacks = Counter(
            "switchyard_placement_fallbacks", "Requests this ingress placed itself: NATS "
            "disconnected, or no scheduler actor answered (unreachable).", ["reason"],
            registry=r)
        self.placement_fallback_active = Gauge(
            "switchyard_placement_fallback_active", "1 while this ingress places requests "
            "itself instead of asking the scheduler actors.", registry=r)
        self.upstream_errors = Counter(
            "switchyard_upstream_errors", "Replica failures, by replica.",
            ["replica"], registry=r)
        self.retries = Counter(
            "switchyard_upstream_retries",
            "Calls retried on another replica before the first byte.", registry=r)
        self.retry_budget_exhausted = Counter(
            "switchyard_upstream_retry_budget_exhausted",
            "Failed calls not retried because the retry budget was spent.", registry=r)
        self.usage_published = Counter(
            "switchyard_usage_events_published", "Usage events stored in JetStream.",
            registry=r)
        self.usage_dropped = Counter(
            "switchyard_usage_events_dropped", "Usage events dropped: outbox full.",
            registry=r)
        self.usage_anomalies = Counter(
            "switchyard_usage_anomalies", "Replica-reported usage clamped before billing, "
            "by kind (missing, negative, prompt_over_bound, cached_over_prompt, "
            "completion_over_max).", ["kind"], registry=r)
        self.usage_spooled = Counter(
            "switchyard_usage_events_spooled", "Usage events written to the disk spool "
            "(NATS away or no ack in time).", registry=r)
        self.usage_spool_depth = Gauge(
            "switchyard_usage_spool_depth_events", "Usage events in the disk spool, "
            "waiting for NATS.", registry=r,
            # The workers of a port share one spool file: each sees its depth.
            multiprocess_mode="livemax")
        self.prompt_hashing = Counter(
            "switchyard_prompt_block_hashing", "Prompts hashed for precise prefix routing, "
            "by outcome (inline, pooled, shed, untokenizable, no_tokenizer).",
            ["outcome"], registry=r)
        self.nats_errors = Counter(
            "switchyard_nats_errors", "Failed NATS publishes and requests.", registry=r)
        self.quota_admissions = Counter(
            "switchyard_quota_admissions", "Requests admitted by quota: under a lease held "
            "by this ingress (lease), by a call to the tenant's shard (shard), or by this "
            "ingress's local bucket while the shard is unreachable (outage).",
            ["path"], registry=r)
        self.quota_shards_away = Gauge(
            "switchyard_quota_shards_away", "Quota shards this ingress's breaker holds "
            "open (unreachable: budgets fail closed, rate limits local).", registry=r)
        self.quota_rejections = Counter(
            "switchyard_quota_rejections", "Requests refused by quota, by reason (requests, "
            "tokens, too_large, concurrency, budget, unpriced).", ["reason"], registry=r)
        self.quota_unavailable = Counter(
            "switchyard_quota_unavailable", "Admissions failed closed (503): the tenant's "
            "shard did not answer within quota.call_timeout_s.", registry=r)
        self.quota_call_duration = Histogram(
            "switchyard_quota_call_duration_seconds", "Calls to a quota shard, resends "
            "included, by call (reserve, commit, release, lease_return).", ["call"],
            buckets=FAST_BUCKETS_S, registry=r)
        self.quota_leases = Counter(
            "switchyard_quota_leases", "Leases granted to this ingress, and returned.",
            ["event"], registry=r)
        self.quota_settle_lost = Counter(
            "switchyard_quota_settle_lost", "Commits, releases or lease returns not "
            "delivered in SETTLE_PATIENCE_S (the shard settles them as fully used).",
            registry=r)

    def labeled(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, looked up once per label set:
        prometheus_client's own lookup takes a lock and checks the values on
        every call, and this is on every request's path. Label values here
        come from small fixed sets (routes, statuses, replicas, kinds)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def exposition(self) -> bytes:
        """The text /metrics serves: this process's, or every worker's."""
        return generate_latest(self._exposed)
