"""Prometheus metrics of one ingress process (its own registry, so tests can
run several ingresses in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FAST_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "switchyard_http_requests", "Requests answered, by route and status.",
            ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "switchyard_http_request_duration_seconds", "Whole request time, by route.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram(
            "switchyard_ttft_seconds", "Time to first token seen by the client.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.placement = Histogram(
            "switchyard_placement_duration_seconds", "Placement round trip over NATS.",
            buckets=FAST_BUCKETS_S, registry=r)
        self.placement_retries = Counter(
            "switchyard_placement_retries", "Placements sent again: a scheduler actor did "
            "not answer in time, or none was serving.", registry=r)
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
            "waiting for NATS.", registry=r)
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
