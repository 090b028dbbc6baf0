"""One tenant's quota ledger: requests and tokens per minute over any 60 s
window, concurrent requests, and a budget in nUSD per UTC day or month.
Owned by exactly one quota shard actor, which persists its changes.

The window is exact, kept as a log of charges. A charge is one admission: a
request's reservation, or a lease (a slice of the allowance that an ingress
spends locally until it expires). Each charge has `until_s`, the last moment
anything it covers may be admitted: a request's admission time, a lease's
expiry. A new charge is admitted only if, with every charge whose `until_s`
lies within the last 60 s, it stays within the limit. Then no 60 s window
ever holds more than the limit (counting a lease over its whole lifetime):
take the charge in a window admitted last; every other charge meeting that
window ended at most 60 s before it was admitted, so it was counted then.
Charges only ever shrink afterwards (a commit to the true tokens, a lease
returned early with what it used), which keeps that true. The log holds one
entry per admission in the last minute, and leases keep that small.

Tokens per minute count a request's estimate (prompt + clamped max_tokens)
at admission and its true tokens from its commit on; a commit above the
estimate (the prompt was counted short) is counted in full, and can push
that window over by the excess: the next admissions wait for it.

Budget: spent (committed, this period) + reserved (open requests and
leases) <= budget_nusd at every admission. Every operation is idempotent by
request or lease id: a settled id is remembered for at least 60 s.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

import msgspec

from scheduler.quota_terms import (
    WINDOW_S,
    Estimate,
    LeaseSizing,
    LeaseSlice,
    RateLimitNumbers,
    Refusal,
    Verdict,
    period_bounds,
)
from scheduler.tenancy import TenantLimits

# A settled id answers retried calls for at least this long.
REMEMBER_S = 60.0
# A reservation never committed nor released (its ingress died) is settled
# as fully spent after this long, like a placement without a completion notice.
RESERVATION_TTL_S = 900.0
META_FIELD = "meta"
CHARGE_PREFIX = "c:"


class Charge(msgspec.Struct, kw_only=True):
    until_s: float
    requests: int
    tokens: int
    # Held against the budget, and slots against concurrency, while open.
    reserved_nusd: int = 0
    concurrent: int = 0
    lease: bool = False
    open: bool = True
    settled_s: float = 0.0


class Meta(msgspec.Struct, kw_only=True):
    period: str = ""
    spent_nusd: int = 0


class OpenRequest(msgspec.Struct, frozen=True, array_like=True):
    """A request admitted under a lease still running when it is returned;
    it becomes a reservation of its own."""

    request_id: str
    tokens: int
    cost_nusd: int


_charge_decoder = msgspec.json.Decoder(Charge)
_meta_decoder = msgspec.json.Decoder(Meta)
_encode = msgspec.json.Encoder().encode


class TenantLedger:
    def __init__(self, retry_after_s: float = 1.0,
                 return_grace_s: float = LeaseSizing().return_grace_s,
                 reservation_ttl_s: float = RESERVATION_TTL_S) -> None:
        """`retry_after_s`: what a refusal that may clear any moment says;
        `return_grace_s`: how long past its expiry a lease may be returned;
        `reservation_ttl_s`: how long a reservation may stay open."""
        self.retry_after_s = retry_after_s
        self.return_grace_s = return_grace_s
        self.reservation_ttl_s = reservation_ttl_s
        self.charges: dict[str, Charge] = {}
        self.meta = Meta()
        self.reserved_nusd = 0
        self.in_use = 0
        self.window_requests = 0
        self.window_tokens = 0
        self._in_window: set[str] = set()
        self._window_heap: list[tuple[float, str]] = []
        self._forget_heap: list[tuple[float, str]] = []
        self._open_leases: set[str] = set()
        self._open_requests: list[tuple[float, str]] = []
        # Field names changed since the last take_changes().
        self._dirty: set[str] = set()

    # --- persistence ---------------------------------------------------------

    @classmethod
    def restore(cls, fields: Mapping[str, bytes | str], now_s: float,
                retry_after_s: float = 1.0, return_grace_s: float = LeaseSizing().return_grace_s,
                reservation_ttl_s: float = RESERVATION_TTL_S) -> TenantLedger:
        """The ledger persisted as these hash fields (take_changes)."""
        ledger = cls(retry_after_s, return_grace_s, reservation_ttl_s)
        if META_FIELD in fields:
            ledger.meta = _meta_decoder.decode(fields[META_FIELD])
        for field, raw in fields.items():
            if field.startswith(CHARGE_PREFIX):
                ledger._add(field.removeprefix(CHARGE_PREFIX), _charge_decoder.decode(raw),
                            now_s, restoring=True)
        ledger._dirty.clear()
        return ledger

    def take_changes(self) -> dict[str, bytes | None]:
        """Hash fields to write since the last call (None: delete it)."""
        changes: dict[str, bytes | None] = {}
        for field in self._dirty:
            if field == META_FIELD:
                changes[field] = _encode(self.meta)
            else:
                charge = self.charges.get(field.removeprefix(CHARGE_PREFIX))
                changes[field] = None if charge is None else _encode(charge)
        self._dirty.clear()
        return changes

    def snapshot(self) -> dict[str, bytes]:
        """Every field of the ledger, for a Redis that lost them; pending
        changes are part of it."""
        self._dirty.clear()
        return {META_FIELD: _encode(self.meta),
                **{CHARGE_PREFIX + i: _encode(c) for i, c in self.charges.items()}}

    def spent_at_least(self, spent_nusd: int) -> None:
        """The period's spend is known to be at least this (the billed truth)."""
        if spent_nusd > self.meta.spent_nusd:
            self.meta.spent_nusd = spent_nusd
            self._dirty.add(META_FIELD)

    def mark_unsaved(self, fields: Iterable[str]) -> None:
        """A write of these fields failed: they go out again with the next one."""
        self._dirty.update(fields)

    # --- operations ----------------------------------------------------------

    def reserve(self, request_id: str, est: Estimate, limits: TenantLimits,
                now_s: float) -> Verdict:
        """Admits one request on its estimate, or refuses it changing nothing."""
        self.advance(now_s, limits)
        known = self.charges.get(request_id)
        if known is not None:
            return Verdict(cost_nusd=known.reserved_nusd, numbers=self.numbers(limits, now_s))
        refused = self._refusal(1, est.tokens, est.cost_nusd, limits, now_s)
        if refused is not None:
            return refused
        cost = est.cost_nusd or 0
        self._add(request_id, Charge(until_s=now_s, requests=1, tokens=est.tokens,
                                     reserved_nusd=cost, concurrent=1), now_s)
        return Verdict(cost_nusd=cost, numbers=self.numbers(limits, now_s))

    def commit(self, request_id: str, tokens: int, cost_nusd: int, now_s: float) -> bool:
        """Settles a reservation with the true usage; False if there was none open."""
        charge = self.charges.get(request_id)
        if charge is None:
            # Admitted where this ledger cannot see (its state was lost): its
            # spend still counts, once.
            charge = Charge(until_s=now_s, requests=1, tokens=tokens)
            self._add(request_id, charge, now_s)
        if charge.lease or not charge.open:
            return False
        self.meta.spent_nusd += cost_nusd
        self._dirty.add(META_FIELD)
        self._settle(request_id, charge.requests, tokens, charge.until_s, now_s)
        return True

    def release(self, request_id: str, now_s: float) -> bool:
        """A request that failed or was abandoned: nothing spent, no tokens."""
        charge = self.charges.get(request_id)
        if charge is None or charge.lease or not charge.open:
            return False
        self._settle(request_id, charge.requests, 0, charge.until_s, now_s)
        return True

    def grant_lease(self, lease_id: str, per_request: Estimate, limits: TenantLimits,
                    sizing: LeaseSizing, now_s: float) -> LeaseSlice | None:
        """A slice of what remains, counted at once; None when it would not
        cover `sizing.min_requests` requests like `per_request`."""
        self.advance(now_s, limits)
        known = self.charges.get(lease_id)
        if known is not None:
            return self._slice(known, limits, sizing) if known.open else None
        if limits.budget_nusd and per_request.cost_nusd is None:
            return None
        if limits.tokens_per_minute and per_request.tokens > limits.tokens_per_minute:
            return None

        def part(limit: int, used: int, unit: int, most: int) -> int | None:
            if not limit:
                return None
            n = min(most, int((limit - used) * sizing.share))
            return n if n >= max(1, unit * sizing.min_requests) else 0

        parts = (part(limits.requests_per_minute, self.window_requests, 1, sizing.max_requests),
                 part(limits.tokens_per_minute, self.window_tokens, per_request.tokens,
                      sizing.max_tokens),
                 part(limits.budget_nusd, self.meta.spent_nusd + self.reserved_nusd,
                      per_request.cost_nusd or 0, sizing.max_nusd),
                 part(limits.max_concurrent_requests, self.in_use, 1, sizing.max_requests))
        if 0 in parts:
            return None
        requests, tokens, nusd, concurrent = (p or 0 for p in parts)
        charge = Charge(until_s=now_s + sizing.ttl_s, requests=requests, tokens=tokens,
                        reserved_nusd=nusd, concurrent=concurrent, lease=True)
        self._add(lease_id, charge, now_s)
        return self._slice(charge, limits, sizing)

    def return_lease(self, lease_id: str, used_requests: int, used_tokens: int,
                     spent_nusd: int, still_open: Iterable[OpenRequest], now_s: float) -> bool:
        """Settles a lease with what its ingress admitted under it: requests,
        true tokens and spend of those completed; the ones still running
        become reservations. False if it was settled already."""
        charge = self.charges.get(lease_id)
        if charge is None:
            # Granted before this ledger's state was lost, or a tab of what
            # an ingress admitted on its own while the shard was away: what
            # it used counts, as of now.
            charge = Charge(until_s=now_s, requests=used_requests, tokens=used_tokens,
                            lease=True)
            self._add(lease_id, charge, now_s)
        if not charge.lease or not charge.open:
            return False
        until_s = min(charge.until_s, now_s)
        self.meta.spent_nusd += spent_nusd
        self._dirty.add(META_FIELD)
        self._settle(lease_id, used_requests, used_tokens, until_s, now_s)
        for req in still_open:
            if req.request_id not in self.charges:
                self._add(req.request_id, Charge(until_s=until_s, requests=0, tokens=req.tokens,
                                                 reserved_nusd=req.cost_nusd, concurrent=1),
                          now_s)
        return True

    def advance(self, now_s: float, limits: TenantLimits) -> None:
        """Moves the window and the budget period to `now_s`. A lease never
        returned (its ingress died) is settled as fully used: its spend is
        unknown, and counting all of it never lets spend past the budget; so
        is a reservation open for longer than `reservation_ttl_s`."""
        period, _ = period_bounds(now_s, limits.budget_period)
        if period != self.meta.period:
            self.meta = Meta(period=period)
            self._dirty.add(META_FIELD)
        for lease_id in [i for i in self._open_leases
                         if self.charges[i].until_s + self.return_grace_s < now_s]:
            lease = self.charges[lease_id]
            self.meta.spent_nusd += lease.reserved_nusd
            self._dirty.add(META_FIELD)
            self._settle(lease_id, lease.requests, lease.tokens, lease.until_s, now_s)
        stale = self._open_requests
        while stale and stale[0][0] + self.reservation_ttl_s < now_s:
            _, request_id = heapq.heappop(stale)
            charge = self.charges.get(request_id)
            if charge is not None and charge.open:
                self.meta.spent_nusd += charge.reserved_nusd
                self._dirty.add(META_FIELD)
                self._settle(request_id, charge.requests, charge.tokens, charge.until_s, now_s)
        heap = self._window_heap
        while heap and heap[0][0] <= now_s - WINDOW_S:
            until_s, charge_id = heapq.heappop(heap)
            charge = self.charges.get(charge_id)
            if charge is not None and charge.until_s == until_s and charge_id in self._in_window:
                self._in_window.discard(charge_id)
                self.window_requests -= charge.requests
                self.window_tokens -= charge.tokens
        forget = self._forget_heap
        while forget and forget[0][0] <= now_s:
            _, charge_id = heapq.heappop(forget)
            charge = self.charges.get(charge_id)
            if (charge is not None and not charge.open and charge_id not in self._in_window
                    and charge.settled_s + REMEMBER_S <= now_s):
                del self.charges[charge_id]
                self._dirty.add(CHARGE_PREFIX + charge_id)

    def numbers(self, limits: TenantLimits, now_s: float) -> RateLimitNumbers:
        reset_s = max(0.0, self._window_heap[0][0] + WINDOW_S - now_s) if self._window_heap \
            else 0.0
        return RateLimitNumbers(
            limit_requests=limits.requests_per_minute,
            remaining_requests=max(0, limits.requests_per_minute - self.window_requests),
            limit_tokens=limits.tokens_per_minute,
            remaining_tokens=max(0, limits.tokens_per_minute - self.window_tokens),
            reset_requests_s=reset_s, reset_tokens_s=reset_s)

    # --- internals -------------------------------------------------------------

    def _refusal(self, requests: int, tokens: int, cost_nusd: int | None,
                 limits: TenantLimits, now_s: float) -> Verdict | None:
        def refuse(refusal: Refusal, retry_after_s: float | None) -> Verdict:
            return Verdict(refusal=refusal, retry_after_s=retry_after_s,
                           numbers=self.numbers(limits, now_s))

        if limits.tokens_per_minute and tokens > limits.tokens_per_minute:
            return refuse("too_large", None)
        if limits.budget_nusd and cost_nusd is None:
            return refuse("unpriced", None)
        if limits.max_concurrent_requests and self.in_use + 1 > limits.max_concurrent_requests:
            return refuse("concurrency", self.retry_after_s)
        if (limits.requests_per_minute
                and self.window_requests + requests > limits.requests_per_minute):
            excess = self.window_requests + requests - limits.requests_per_minute
            return refuse("requests", self._frees_in_s(excess, "requests", now_s))
        if limits.tokens_per_minute and self.window_tokens + tokens > limits.tokens_per_minute:
            excess = self.window_tokens + tokens - limits.tokens_per_minute
            return refuse("tokens", self._frees_in_s(excess, "tokens", now_s))
        if limits.budget_nusd:
            cost = cost_nusd or 0
            if self.meta.spent_nusd + cost > limits.budget_nusd:
                _, next_period_s = period_bounds(now_s, limits.budget_period)
                return refuse("budget", max(0.0, next_period_s - now_s))
            if self.meta.spent_nusd + self.reserved_nusd + cost > limits.budget_nusd:
                # Held by requests in flight: may clear when they settle.
                return refuse("budget", self.retry_after_s)
        return None

    def _frees_in_s(self, excess: int, kind: str, now_s: float) -> float:
        """When enough charges will have left the window to admit `excess` more."""
        freed = 0
        for until_s, charge_id in sorted((self.charges[i].until_s, i) for i in self._in_window):
            freed += getattr(self.charges[charge_id], kind)
            if freed >= excess:
                return max(0.0, until_s + WINDOW_S - now_s)
        return WINDOW_S

    def _add(self, charge_id: str, charge: Charge, now_s: float,
             restoring: bool = False) -> None:
        self.charges[charge_id] = charge
        self._dirty.add(CHARGE_PREFIX + charge_id)
        if charge.until_s > now_s - WINDOW_S:
            self._in_window.add(charge_id)
            self.window_requests += charge.requests
            self.window_tokens += charge.tokens
            heapq.heappush(self._window_heap, (charge.until_s, charge_id))
        if charge.open:
            self.reserved_nusd += charge.reserved_nusd
            self.in_use += charge.concurrent
            if charge.lease:
                self._open_leases.add(charge_id)
            else:
                heapq.heappush(self._open_requests, (charge.until_s, charge_id))
        elif restoring:
            self._schedule_forget(charge_id, charge)

    def _settle(self, charge_id: str, requests: int, tokens: int, until_s: float,
                now_s: float) -> None:
        charge = self.charges[charge_id]
        if charge_id in self._in_window:
            self.window_requests += requests - charge.requests
            self.window_tokens += tokens - charge.tokens
            if until_s != charge.until_s:
                heapq.heappush(self._window_heap, (until_s, charge_id))
        charge.requests, charge.tokens, charge.until_s = requests, tokens, until_s
        charge.open = False
        charge.settled_s = now_s
        self.reserved_nusd -= charge.reserved_nusd
        self.in_use -= charge.concurrent
        self._open_leases.discard(charge_id)
        self._dirty.add(CHARGE_PREFIX + charge_id)
        self._schedule_forget(charge_id, charge)

    def _schedule_forget(self, charge_id: str, charge: Charge) -> None:
        heapq.heappush(self._forget_heap, (max(charge.until_s + WINDOW_S,
                                               charge.settled_s + REMEMBER_S), charge_id))

    def _slice(self, charge: Charge, limits: TenantLimits, sizing: LeaseSizing) -> LeaseSlice:
        return LeaseSlice(
            requests=charge.requests if limits.requests_per_minute else None,
            tokens=charge.tokens if limits.tokens_per_minute else None,
            nusd=charge.reserved_nusd if limits.budget_nusd else None,
            concurrent=charge.concurrent if limits.max_concurrent_requests else None,
            ttl_s=sizing.ttl_s, max_tokens_cap=limits.max_tokens_cap)
