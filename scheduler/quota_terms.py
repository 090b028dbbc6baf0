"""What a quota decision says, shared by the ledger (scheduler/quota_ledger.py),
the wire messages, the error tree and the ingress's quota client: the
estimate a request is admitted on, the verdict, the numbers for OpenAI's
x-ratelimit-* headers, and a lease (a slice of a tenant's allowance that one
ingress spends locally)."""

from __future__ import annotations

import calendar
import hashlib
import math
import time
from typing import Literal

import msgspec

from scheduler.tenancy import Price, TenantLimits

# Rate limits hold over any window of this length.
WINDOW_S = 60.0

# A shard's answers (QuotaReply.error) that fail the call at once, not
# resent: its Redis cannot be reached (so none of its tenants' calls can
# succeed for now), or a budget tenant's spend cannot be known yet.
STORE_UNAVAILABLE = "store_unavailable"
SPEND_UNKNOWN = "spend_unknown"

# Why a reserve or a lease was refused ("" = admitted).
Refusal = Literal["", "requests", "tokens", "concurrency", "budget", "unpriced", "too_large"]


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """A request as admission sees it: prompt tokens plus max_tokens clamped to
    the tenant's cap, priced as if no prompt token were cached (an upper
    bound). `cost_nusd` None: the model has no price now."""

    tokens: int
    cost_nusd: int | None


def estimate(limits: TenantLimits, price: Price | None, prompt_tokens: int,
             max_tokens: int) -> Estimate:
    clamped_tokens = (min(max_tokens, limits.max_tokens_cap) if limits.max_tokens_cap
                      else max_tokens)
    cost = None if price is None else price.cost_nusd(prompt_tokens, 0, clamped_tokens)
    return Estimate(tokens=prompt_tokens + clamped_tokens, cost_nusd=cost)


def openai_duration(seconds: float) -> str:
    """A reset as OpenAI writes it (Go's duration format): "20ms", "1.5s",
    "6m0s", "1h0m0s"; rounded up to the millisecond, so a client waiting
    that long finds the capacity back."""
    ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest_ms = divmod(ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimitNumbers(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's x-ratelimit-* headers (0 limits: none of that kind). A reset
    is when capacity next comes back: the oldest charge in the window leaves it."""

    limit_requests: int = 0
    remaining_requests: int = 0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_requests_s: float = 0.0
    reset_tokens_s: float = 0.0

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.limit_requests:
            out |= {"x-ratelimit-limit-requests": str(self.limit_requests),
                    "x-ratelimit-remaining-requests": str(max(0, self.remaining_requests)),
                    "x-ratelimit-reset-requests": openai_duration(self.reset_requests_s)}
        if self.limit_tokens:
            out |= {"x-ratelimit-limit-tokens": str(self.limit_tokens),
                    "x-ratelimit-remaining-tokens": str(max(0, self.remaining_tokens)),
                    "x-ratelimit-reset-tokens": openai_duration(self.reset_tokens_s)}
        return out


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """A reserve's answer. Refused: `refusal` names the limit and
    `retry_after_s` says when the same request would fit (None: never, as
    things stand: the budget's period must end or the limits change)."""

    refusal: Refusal = ""
    retry_after_s: float | None = None
    cost_nusd: int = 0
    numbers: RateLimitNumbers = RateLimitNumbers()

    @property
    def admitted(self) -> bool:
        return not self.refusal


class LeaseSlice(msgspec.Struct, frozen=True, kw_only=True):
    """Granted to one ingress for `ttl_s` from its ask: it admits requests of
    this model locally while every bounded part covers them. None: not
    limited. The slice already counts against the tenant's limits; what is
    not used comes back when the lease is returned."""

    requests: int | None = None
    tokens: int | None = None
    nusd: int | None = None
    concurrent: int | None = None
    ttl_s: float = 0.0
    # To estimate the requests it admits exactly as the owner would.
    price: Price | None = None
    max_tokens_cap: int = 0


class LeaseSizing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How big a lease is: `share` of what remains of each limit, at most the
    `max_*` of it, for `ttl_s`; no lease unless it covers `min_requests`
    requests like the one that asked (near a limit the ingress then reserves
    per request, so the limit stays exact)."""

    ttl_s: float = 2.0
    share: float = 0.1
    min_requests: int = 2
    max_requests: int = 100
    max_tokens: int = 100_000
    max_nusd: int = 100_000_000
    # An unreturned lease (its ingress died) is settled as fully used after this.
    return_grace_s: float = 5.0


def shard_of(tenant_id: str, shards: int) -> int:
    """The quota shard that owns a tenant: a hash every process computes alike."""
    digest = hashlib.blake2b(tenant_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def period_bounds(now_s: float, period: Literal["day", "month"]) -> tuple[str, float]:
    """The UTC calendar period holding `now_s`: its name and when the next starts."""
    t = time.gmtime(now_s)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return time.strftime("%Y-%m-%d", t), float(start + 86_400)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return time.strftime("%Y-%m", t), float(calendar.timegm((year, month, 1, 0, 0, 0)))


class QuotaConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The quota shard actors (actors/quota.py) and the ingress's quota client
    (router/quota_client.py); `[quota]` in the config."""

    # Tenants are hashed onto this many shard actors; every process must agree.
    shards: int = 2
    # Bounds one admission's calls to its shard (resent to a restarted one
    # within it); past it a budget fails closed with 503 + Retry-After and
    # the shard's breaker opens: its tenants' admissions stop waiting for it,
    # and one probe goes every `breaker_open_s` until it answers again.
    call_timeout_s: float = 1.0
    attempt_timeout_s: float = 0.1
    breaker_open_s: float = 0.5
    # Ingress processes sharing the limits: while a tenant's shard cannot be
    # reached, each admits its rate-limited tenants from a local bucket of
    # limit // ingress_processes (so all of them together stay within the
    # limit); budgets fail closed. Count every ingress process of the fleet;
    # `python -m router --workers N` raises it to at least N by itself.
    ingress_processes: int = 1
    # The shards' ledgers live in this Redis ("": the one of [redis]); a
    # shard's call to it is bounded by store_timeout_s, after which the shard
    # answers "unavailable" at once and probes it every store_probe_s.
    redis_url: str = ""
    store_timeout_s: float = 0.5
    store_probe_s: float = 0.2
    # A shard loading a tenant with a budget asks the metering service for
    # the period's billed spend (within this), so a lost checkpoint never
    # lets it count from 0; without an answer the budget fails closed.
    truth_timeout_s: float = 1.0
    # Retry-After of a refusal that may clear any moment (concurrency, budget
    # held by reservations in flight) and of a 503 when the shard is away.
    retry_after_s: float = 1.0
    # Tenants' limits and models' prices are re-read from Redis this often.
    cache_ttl_s: float = 1.0
    # A reservation neither committed nor released in this long (its ingress
    # died) is settled as fully spent.
    reservation_ttl_s: float = 900.0
    # Each tenant's ledger is the Redis hash <redis_prefix><tenant id>.
    redis_prefix: str = "sy:quota:"
    lease: LeaseSizing = LeaseSizing()
