"""The ingress's own quota decisions while a tenant's shard cannot be reached
(scheduler/quota_outage.py has the rules): a breaker per shard, each
tenant's admissions at this ingress over the last minute, and per (tenant,
model) a tab of what was admitted locally, handed to the shard as a lease
return once it answers again, so it counts them in its window (and the
requests still running become reservations there)."""

from __future__ import annotations

import collections
import logging
import math
import uuid
from collections.abc import Callable

from router.metrics import Metrics
from router.quota_lease import Lease
from scheduler.errors import quota_refusal
from scheduler.quota_outage import LocalWindow, ShardBreaker, local_verdict
from scheduler.quota_terms import (
    LeaseSlice,
    QuotaConfig,
    RateLimitNumbers,
    estimate,
    shard_of,
)
from scheduler.tenancy import TenantLimits

log = logging.getLogger("switchyard.quota_client")


class OutageDesk:
    def __init__(self, cfg: QuotaConfig, clock_s: Callable[[], float], metrics: Metrics) -> None:
        self.cfg = cfg
        self.clock_s = clock_s
        self._metrics = metrics
        self._breakers: dict[int, ShardBreaker] = {}
        # Tenants with a rate limit only: their admissions here in the last minute.
        self._windows: dict[str, LocalWindow] = {}
        # Every tenant's requests admitted here and not yet settled.
        self._open: collections.Counter[str] = collections.Counter()
        self.tabs: dict[tuple[str, str], Lease] = {}
        self.counts = dict.fromkeys(("admitted", "refused", "probes", "away", "back",
                                     "away_ms"), 0)
        self._away_since_s: dict[int, float] = {}

    def breaker(self, tenant_id: str) -> tuple[int, ShardBreaker]:
        shard = shard_of(tenant_id, self.cfg.shards)
        breaker = self._breakers.get(shard)
        if breaker is None:
            breaker = self._breakers[shard] = ShardBreaker(self.cfg.breaker_open_s)
        return shard, breaker

    def failed(self, shard: int, breaker: ShardBreaker) -> None:
        if breaker.failed(self.clock_s()):
            # Logged once per outage, not per request.
            self.counts["away"] += 1
            self._away_since_s[shard] = self.clock_s()
            self._metrics.quota_shards_away.inc()
            log.warning("quota shard %d unreachable: budgets fail closed, rate limits are "
                        "admitted from this ingress's local bucket (1/%d of each limit)",
                        shard, self.cfg.ingress_processes)

    def succeeded(self, shard: int, breaker: ShardBreaker) -> list[tuple[tuple[str, str], Lease]]:
        """The shard answered: the tabs of its tenants, to be returned now."""
        if not breaker.succeeded():
            return []
        self.counts["back"] += 1
        self.counts["away_ms"] += round(1000 * (self.clock_s() - self._away_since_s.pop(shard)))
        self._metrics.quota_shards_away.dec()
        log.warning("quota shard %d answers again; its tenants' local admissions go to it",
                    shard)
        ended = [(key, tab) for key, tab in self.tabs.items()
                 if shard_of(key[0], self.cfg.shards) == shard]
        for key, tab in ended:
            del self.tabs[key]
            # Returned at once: the requests still running become reservations.
            tab.deadline_s = self.clock_s() - self.cfg.lease.return_grace_s
        return ended

    def admit(self, key: tuple[str, str], request_id: str, prompt_tokens: int,
              max_tokens: int, limits: TenantLimits) -> tuple[Lease, RateLimitNumbers]:
        """Admits on this ingress's share of the rate limits (never a budget:
        the caller fails those closed) under the tab of (tenant, model), or
        raises the refusal."""
        tenant_id, model = key
        now_s = self.clock_s()
        tokens = estimate(limits, None, prompt_tokens, max_tokens).tokens
        verdict = local_verdict(limits, self.cfg.ingress_processes,
                                self._windows.get(tenant_id) or LocalWindow(),
                                self._open[tenant_id], tokens, now_s, self.cfg.retry_after_s)
        if not verdict.admitted:
            self.counts["refused"] += 1
            self._metrics.quota_rejections.labels(verdict.refusal).inc()
            raise quota_refusal(verdict, tenant_id, model)
        tab = self.tabs.get(key)
        if tab is None:
            tab = self.tabs[key] = Lease("outage-" + uuid.uuid4().hex, LeaseSlice(
                max_tokens_cap=limits.max_tokens_cap), RateLimitNumbers(), math.inf)
        tab.take(request_id, tokens, 0)
        self.counts["admitted"] += 1
        self._metrics.quota_admissions.labels("outage").inc()
        return tab, verdict.numbers

    def noted(self, tenant_id: str, prompt_tokens: int, max_tokens: int,
              limits: TenantLimits | None) -> None:
        """A request admitted here, by any path."""
        self._open[tenant_id] += 1
        if limits is not None and (limits.requests_per_minute or limits.tokens_per_minute):
            tokens = estimate(limits, None, prompt_tokens, max_tokens).tokens
            window = self._windows.get(tenant_id)
            if window is None:
                window = self._windows[tenant_id] = LocalWindow()
            window.note(self.clock_s(), 1, tokens)

    def ended(self, tenant_id: str) -> None:
        """A request admitted here was settled or released."""
        self._open[tenant_id] -= 1
        if self._open[tenant_id] <= 0:
            del self._open[tenant_id]
