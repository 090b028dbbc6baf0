"""A lease as the ingress holding it sees it: what is left of the slice the
tenant's shard granted, the requests admitted under it, and what goes back
when it ends (router/quota_client.py)."""

from __future__ import annotations

import asyncio

import msgspec

from scheduler.quota_ledger import OpenRequest
from scheduler.quota_terms import LeaseSlice, RateLimitNumbers
from scheduler.wire import QuotaLeaseReturn


class Lease:
    """What is left of a lease; None parts are not limited."""

    def __init__(self, lease_id: str, granted: LeaseSlice, numbers: RateLimitNumbers,
                 deadline_s: float) -> None:
        self.lease_id = lease_id
        self.granted = granted
        self.numbers = numbers
        self.deadline_s = deadline_s
        self.requests_left = granted.requests
        self.tokens_left = granted.tokens
        self.nusd_left = granted.nusd
        self.slots_left = granted.concurrent
        self.used_requests = 0
        self.used_tokens = 0
        self.spent_nusd = 0
        # Admitted, not yet settled: request id -> (tokens, nUSD) estimated.
        self.open: dict[str, tuple[int, int]] = {}
        # Once it ends, its return to the shard; `sent` once that is on its
        # way (from then on its requests settle with the shard).
        self.returning: asyncio.Task[None] | None = None
        self.sent = False
        self.drained = asyncio.Event()

    def take(self, request_id: str, tokens: int, cost_nusd: int) -> bool:
        wants = (1, tokens, cost_nusd, 1)
        lefts = (self.requests_left, self.tokens_left, self.nusd_left, self.slots_left)
        if any(left is not None and want > left for want, left in zip(wants, lefts, strict=True)):
            return False
        self.requests_left, self.tokens_left, self.nusd_left, self.slots_left = (
            None if left is None else left - want for want, left in zip(wants, lefts, strict=True))
        self.used_requests += 1
        self.open[request_id] = (tokens, cost_nusd)
        return True

    def settle(self, request_id: str, tokens: int, cost_nusd: int) -> None:
        """Local: what the request did not use may admit others under this lease."""
        reserved_tokens, reserved_nusd = self.open.pop(request_id)
        if not self.open and self.returning is not None:
            self.drained.set()
        self.used_tokens += tokens
        self.spent_nusd += cost_nusd
        if self.tokens_left is not None:
            self.tokens_left += reserved_tokens - tokens
        if self.nusd_left is not None:
            self.nusd_left += reserved_nusd - cost_nusd
        if self.slots_left is not None:
            self.slots_left += 1

    def remaining(self) -> RateLimitNumbers:
        """The shard's numbers at the grant, plus what this lease has left
        (counted as used there)."""
        numbers = self.numbers
        return msgspec.structs.replace(
            numbers,
            remaining_requests=numbers.remaining_requests + (self.requests_left or 0),
            remaining_tokens=numbers.remaining_tokens + (self.tokens_left or 0))

    def as_return(self, tenant_id: str) -> QuotaLeaseReturn:
        return QuotaLeaseReturn(
            tenant_id=tenant_id, lease_id=self.lease_id, used_requests=self.used_requests,
            used_tokens=self.used_tokens, spent_nusd=self.spent_nusd,
            still_open=tuple(OpenRequest(rid, t, c) for rid, (t, c) in self.open.items()))
