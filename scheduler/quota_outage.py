"""What an ingress decides on its own while a tenant's quota shard cannot be
reached (router/quota_client.py): a circuit breaker per shard, and the local
bucket that admits rate-limited tenants meanwhile.

Breaker: a failed or timed-out admission call opens it; while open, admissions
of that shard's tenants do not wait for the shard at all (a budget fails
closed at once). After `open_s` one probe may go to the shard; its success
closes the breaker, its failure opens it for another `open_s`.

Local bucket: each of the N ingress processes sharing a tenant's limits
(`quota.ingress_processes`) admits at most limit // N in any 60 s window, and
at most max_concurrent_requests // N at once, so the N of them together stay
within the limit while no shard counts for them. The window counts every
admission this ingress made for the tenant (through the shard, a lease or the
bucket), so one that was busy just before the outage does not get a fresh
allowance at its start. Tenants with a budget are never admitted locally: an
unseen spend could exceed it."""

from __future__ import annotations

import math

from scheduler.quota_terms import WINDOW_S, RateLimitNumbers, Refusal, Verdict
from scheduler.tenancy import TenantLimits

# The window is kept in one-second slots; a slot leaves it only once all of
# it is older than WINDOW_S, so the count errs on the high side by < 1 s.
SLOT_S = 1.0
_SLOTS = int(WINDOW_S / SLOT_S) + 1


class ShardBreaker:
    def __init__(self, open_s: float) -> None:
        """`open_s`: how long it fails fast after a failure before one probe."""
        self.open_s = open_s
        self.open = False
        self._probe_at_s = 0.0
        self._probing = False

    def failed(self, now_s: float) -> bool:
        """A call failed: open (again). True if it was closed until now."""
        was_closed = not self.open
        self.open, self._probing = True, False
        self._probe_at_s = now_s + self.open_s
        return was_closed

    def succeeded(self) -> bool:
        """A call was answered: closed. True if it was open until now."""
        was_open = self.open
        self.open = self._probing = False
        return was_open

    def take_probe(self, now_s: float) -> bool:
        """Open and due for a probe that nobody is making: the caller makes it
        (and reports it with failed() or succeeded())."""
        if not self.open or self._probing or now_s < self._probe_at_s:
            return False
        self._probing = True
        return True


class LocalWindow:
    """One tenant's admissions at this ingress: requests and tokens of the
    last 60 s, in one-second slots."""

    def __init__(self) -> None:
        self._slot_ids = [-1] * _SLOTS
        self._requests = [0] * _SLOTS
        self._tokens = [0] * _SLOTS

    def note(self, now_s: float, requests: int, tokens: int) -> None:
        slot_id = int(now_s // SLOT_S)
        i = slot_id % _SLOTS
        if self._slot_ids[i] != slot_id:
            self._slot_ids[i], self._requests[i], self._tokens[i] = slot_id, 0, 0
        self._requests[i] += requests
        self._tokens[i] += tokens

    def totals(self, now_s: float) -> tuple[int, int]:
        """(requests, tokens) in the slots that still meet the last 60 s."""
        oldest = int(now_s // SLOT_S) - _SLOTS + 1
        live = [i for i, slot_id in enumerate(self._slot_ids) if slot_id >= oldest]
        return sum(self._requests[i] for i in live), sum(self._tokens[i] for i in live)

    def frees_in_s(self, now_s: float) -> float:
        """When the oldest slot still counted leaves the window."""
        oldest = int(now_s // SLOT_S) - _SLOTS + 1
        live = [s for s in self._slot_ids if s >= oldest]
        return 0.0 if not live else max(0.0, (min(live) + _SLOTS) * SLOT_S - now_s)


def local_share(limit: int, ingresses: int) -> int:
    """One ingress's part of a limit (0: none of that kind)."""
    return limit // max(1, ingresses) if limit else 0


def local_verdict(limits: TenantLimits, ingresses: int, window: LocalWindow, open_here: int,
                  tokens: int, now_s: float, retry_after_s: float) -> Verdict:
    """Whether this ingress may admit a request of `tokens` on its own now
    (rate limits only: the caller never admits a budget locally);
    `open_here`: the tenant's requests it has running; `retry_after_s`: what
    a concurrency refusal says."""
    requests_used, tokens_used = window.totals(now_s)
    rpm = local_share(limits.requests_per_minute, ingresses)
    tpm = local_share(limits.tokens_per_minute, ingresses)
    numbers = RateLimitNumbers(
        limit_requests=limits.requests_per_minute, limit_tokens=limits.tokens_per_minute,
        remaining_requests=max(0, rpm - requests_used),
        remaining_tokens=max(0, tpm - tokens_used),
        reset_requests_s=window.frees_in_s(now_s), reset_tokens_s=window.frees_in_s(now_s))
    refusal: Refusal = ""
    if limits.max_concurrent_requests and open_here + 1 > local_share(
            limits.max_concurrent_requests, ingresses):
        refusal = "concurrency"
    elif limits.requests_per_minute and requests_used + 1 > rpm:
        refusal = "requests"
    elif limits.tokens_per_minute and tokens_used + tokens > tpm:
        refusal = "tokens" if tokens <= tpm else "too_large"
    if not refusal:
        return Verdict(numbers=numbers)
    wait_s = (None if refusal == "too_large" else retry_after_s if refusal == "concurrency"
              else math.ceil(max(SLOT_S, window.frees_in_s(now_s))))
    return Verdict(refusal=refusal, retry_after_s=wait_s, numbers=numbers)
