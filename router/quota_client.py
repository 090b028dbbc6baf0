"""The ingress's side of quotas: admit a request before it is placed, settle
it when it ends.

Fast path: per (tenant, model) the ingress holds a lease, a slice of the
tenant's allowance granted by the tenant's shard (requests, tokens, money,
concurrent slots, for `quota.lease.ttl_s` from the ask), and admits locally
while the lease covers the request; it settles leased requests locally too,
and the unused part goes back to the shard when the lease ends (expired,
exhausted or at shutdown) with what was used; requests still running then
become reservations at the shard. Without a lease, an admission is one call
to the shard, which grants a new lease if it is worth it (so the request is
admitted under it) or else reserves this one request: near a limit the
shard grants no leases and every admission is exact.

The shard cannot be reached within `quota.call_timeout_s` (resending the
same idempotent call meanwhile, e.g. while Ray restarts it), or answers that
its Redis is away: the shard's breaker opens (router/quota_outage.py), and
until a probe finds it back its tenants' admissions do not wait for it: a
tenant with a budget, or whose limits the caller did not give, fails closed
with QuotaUnavailable (503 + Retry-After); one with rate limits only is
admitted from this ingress's local bucket (its 1/`quota.ingress_processes`
share of each limit). A lease already held keeps admitting until it ends,
which covers a shard restart for busy tenants.
Settling calls (commit, release, lease return) are retried in the
background for `SETTLE_PATIENCE_S`; one that never arrives is settled by the
shard as fully used (reservation TTL, lease return grace)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.metrics import Metrics
from router.quota_calls import ShardCalls
from router.quota_lease import Lease
from router.quota_outage import OutageDesk
from scheduler.errors import QuotaUnavailable, quota_refusal
from scheduler.quota_outage import ShardBreaker
from scheduler.quota_terms import (
    SPEND_UNKNOWN,
    QuotaConfig,
    RateLimitNumbers,
    estimate,
)
from scheduler.tenancy import TenantLimits
from scheduler.wire import (
    ControlChanged,
    QuotaCall,
    QuotaCommit,
    QuotaLeaseReturn,
    QuotaRelease,
    QuotaReserve,
    control_changed_decoder,
)

log = logging.getLogger("switchyard.quota_client")
# How long a commit, release or lease return keeps being resent.
SETTLE_PATIENCE_S = 30.0


@dataclass
class Admission:
    tenant_id: str
    request_id: str
    model: str
    numbers: RateLimitNumbers
    # Set when admitted under a lease, or under the local bucket's tab while
    # the shard was away (settled locally while either lasts).
    lease: Lease | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers (as of the last word from the shard)."""
        return self.numbers.headers()


class QuotaClient:
    def __init__(self, nc: NATS, cfg: QuotaConfig,
                 clock_s: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        """`metrics`: the ingress's (a registry of its own when not given)."""
        self._nc = nc
        self.cfg = cfg
        self.clock_s = clock_s
        self._metrics = metrics or Metrics()
        self._leases: dict[tuple[str, str], Lease] = {}
        # Near a limit the shard grants no lease: admit per request for a while.
        self._no_lease_until_s: dict[tuple[str, str], float] = {}
        # One lease ask per (tenant, model) at a time; the others wait for it.
        self._asking: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.counts = dict.fromkeys(("local", "calls", "leases", "reserved", "refused",
                                     "unavailable", "settle_lost"), 0)
        self.outage = OutageDesk(cfg, clock_s, self._metrics)
        self._calls = ShardCalls(nc, cfg, self._metrics, self.outage, self.counts,
                                 self._spawn, self._came_back)

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="quota-lease-reaper")

    async def aclose(self) -> None:
        """Returns every lease (bounded by the settle patience)."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for key, lease in [*self._leases.items(), *self.outage.tabs.items()]:
            self._end(key, lease)
        self.outage.tabs.clear()
        await self.drain()

    async def drain(self) -> None:
        """Waits until every settling call has been answered (or given up)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def admit(self, tenant_id: str, request_id: str, model: str, prompt_tokens: int,
                    max_tokens: int, limits: TenantLimits | None = None) -> Admission:
        """Raises RateLimited, BudgetExhausted, ModelNotPriced (refused) or
        QuotaUnavailable (the shard did not answer in time). `limits`: the
        tenant's as this ingress knows them (its key's), for the local bucket
        while the shard is away; without them such an admission fails closed."""
        try:
            admitted = await self._admit(tenant_id, request_id, model, prompt_tokens,
                                         max_tokens)
        except QuotaUnavailable:
            if limits is None or limits.budget_nusd:
                raise
            tab, numbers = self.outage.admit((tenant_id, model), request_id, prompt_tokens,
                                             max_tokens, limits)
            admitted = Admission(tenant_id, request_id, model, numbers, tab)
        self.outage.noted(tenant_id, prompt_tokens, max_tokens, limits)
        return admitted

    async def _admit(self, tenant_id: str, request_id: str, model: str, prompt_tokens: int,
                     max_tokens: int) -> Admission:
        key = (tenant_id, model)
        while (admitted := self._admit_leased(key, request_id, prompt_tokens,
                                              max_tokens)) is None:
            asking = self._asking.get(key)
            if asking is None:
                break
            # Another admission is asking for a lease: this one may fit in it.
            if not await asyncio.shield(asking):
                # The shard did not answer that ask in time: failed closed now,
                # not after asking again in turn (N waiters would wait N timeouts).
                raise self._calls.unavailable(tenant_id, admitting=True)
        if admitted is not None:
            return admitted
        if self._no_lease_until_s.get(key, 0.0) > self.clock_s():
            return await self._unabandoned(self._reserve(key, request_id, prompt_tokens,
                                                         max_tokens, lease_id=""))
        # Set before the call starts: the admissions arriving meanwhile wait for it.
        asked = self._asking[key] = asyncio.get_running_loop().create_future()
        return await self._unabandoned(self._ask_lease(key, asked, request_id, prompt_tokens,
                                                       max_tokens))

    def settle(self, adm: Admission, prompt_tokens: int, cached_tokens: int,
               completion_tokens: int) -> None:
        """The request ended with this usage (a partial stream: what it generated)."""
        self.outage.ended(adm.tenant_id)
        lease = adm.lease
        if lease is not None and not lease.sent:
            price = lease.granted.price
            cost = 0 if price is None else price.cost_nusd(prompt_tokens, cached_tokens,
                                                           completion_tokens)
            lease.settle(adm.request_id, prompt_tokens + completion_tokens, cost)
            return
        self._in_background(adm.tenant_id, QuotaCommit(
            tenant_id=adm.tenant_id, request_id=adm.request_id, model=adm.model,
            prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
            completion_tokens=completion_tokens), after=lease)

    def release(self, adm: Admission) -> None:
        """The request failed before the replica took it, or its client left
        first: nothing spent."""
        self.outage.ended(adm.tenant_id)
        lease = adm.lease
        if lease is not None and not lease.sent:
            lease.settle(adm.request_id, 0, 0)
            return
        self._in_background(adm.tenant_id, QuotaRelease(
            tenant_id=adm.tenant_id, request_id=adm.request_id), after=lease)

    def forget(self, changed: ControlChanged) -> None:
        """A tenant's limits or a model's price changed: the leases taken on
        the old ones end now (returned as usual), so the next admission asks
        the shard, which applies the new ones."""
        if changed.kind not in ("tenant", "price"):
            return
        at = 0 if changed.kind == "tenant" else 1
        for key, lease in list(self._leases.items()):
            if key[at] == changed.id:
                self._end(key, lease)
        for key in [k for k in self._no_lease_until_s if k[at] == changed.id]:
            del self._no_lease_until_s[key]

    async def on_control_changed(self, msg: Msg) -> None:
        """The ControlChanged subscription's callback."""
        try:
            self.forget(control_changed_decoder.decode(msg.data))
        except msgspec.DecodeError:
            # A newer peer's message may not decode here: end every lease.
            log.warning("undecodable control change; every quota lease ended")
            for key, lease in list(self._leases.items()):
                self._end(key, lease)

    # --- internals -------------------------------------------------------------

    async def _ask_lease(self, key: tuple[str, str], asked: asyncio.Future[bool],
                         request_id: str, prompt_tokens: int, max_tokens: int) -> Admission:
        """`asked` is set once the ask ends: whether the shard answered it."""
        answered = True
        try:
            return await self._reserve(key, request_id, prompt_tokens, max_tokens,
                                       lease_id="lease-" + uuid.uuid4().hex)
        except QuotaUnavailable:
            answered = False
            raise
        finally:
            del self._asking[key]
            asked.set_result(answered)

    async def _unabandoned(self, call: Coroutine[None, None, Admission]) -> Admission:
        """Runs a call to the shard to its end even when the request is
        cancelled meanwhile (its client left): what it admitted is then
        released at once, and a lease it brought is kept, instead of the
        shard holding them until it counts them as fully used."""
        task = asyncio.create_task(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, task: asyncio.Task[Admission]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.release(task.result())

    def _admit_leased(self, key: tuple[str, str], request_id: str, prompt_tokens: int,
                      max_tokens: int) -> Admission | None:
        lease = self._leases.get(key)
        if lease is None:
            return None
        granted = lease.granted
        est = estimate(TenantLimits(max_tokens_cap=granted.max_tokens_cap), granted.price,
                       prompt_tokens, max_tokens)
        if self.clock_s() < lease.deadline_s and lease.take(request_id, est.tokens,
                                                             est.cost_nusd or 0):
            self.counts["local"] += 1
            self._metrics.labeled(self._metrics.quota_admissions, "lease").inc()
            return Admission(key[0], request_id, key[1], lease.remaining(), lease)
        self._end(key, lease)
        return None

    async def _reserve(self, key: tuple[str, str], request_id: str, prompt_tokens: int,
                       max_tokens: int, lease_id: str) -> Admission:
        tenant_id, model = key
        asked_at_s = self.clock_s()
        shard, breaker = self.outage.breaker(tenant_id)
        if breaker.open:
            # No call: nothing to give back.
            if breaker.take_probe(asked_at_s):
                self._calls.probe(shard, breaker, tenant_id)
            raise self._calls.unavailable(tenant_id, admitting=True)
        try:
            reply = await self._calls.call(tenant_id, QuotaReserve(
                tenant_id=tenant_id, request_id=request_id, model=model,
                prompt_tokens=prompt_tokens, max_tokens=max_tokens, lease_id=lease_id))
        except QuotaUnavailable:
            # The shard may have reserved it, or granted the lease, with the
            # answer lost or late: given back (a no-op if not), rather than
            # held until the shard counts it as spent.
            self._in_background(tenant_id, QuotaRelease(tenant_id=tenant_id,
                                                        request_id=request_id), after=None)
            if lease_id:
                self._in_background(tenant_id, QuotaLeaseReturn(tenant_id=tenant_id,
                                                                lease_id=lease_id), after=None)
            raise
        if reply.error == SPEND_UNKNOWN:
            # The shard does not know yet what this budget tenant spent.
            raise self._calls.unavailable(tenant_id, admitting=True)
        if reply.lease is not None:
            self.counts["leases"] += 1
            self._metrics.quota_leases.labels("granted").inc()
            # From the ask: the shard's own expiry is later, never earlier.
            lease = Lease(lease_id, reply.lease, reply.verdict.numbers,
                           asked_at_s + reply.lease.ttl_s)
            old = self._leases.get(key)
            if old is not None:
                self._end(key, old)
            self._leases[key] = lease
            admitted = self._admit_leased(key, request_id, prompt_tokens, max_tokens)
            if admitted is not None:
                return admitted
            return await self._reserve(key, request_id, prompt_tokens, max_tokens, "")
        if lease_id:
            self._no_lease_until_s[key] = self.clock_s() + self.cfg.lease.ttl_s / 2
        verdict = reply.verdict
        if not verdict.admitted:
            self.counts["refused"] += 1
            self._metrics.quota_rejections.labels(verdict.refusal).inc()
            raise quota_refusal(verdict, tenant_id, model)
        self.counts["reserved"] += 1
        self._metrics.quota_admissions.labels("shard").inc()
        return Admission(tenant_id, request_id, model, verdict.numbers)

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _came_back(self, shard: int, breaker: ShardBreaker) -> None:
        for key, tab in self.outage.succeeded(shard, breaker):
            self._end(key, tab)

    def _end(self, key: tuple[str, str], lease: Lease) -> None:
        """No more admissions under it; hands back what it did not use once
        the requests it admitted have ended, or before the shard would take
        it as abandoned: the ones still running then become reservations."""
        if self._leases.get(key) is lease:
            del self._leases[key]
        if lease.returning is None:
            if not lease.open:
                lease.drained.set()
            lease.returning = asyncio.create_task(self._return(key[0], lease))
            self._background.add(lease.returning)
            lease.returning.add_done_callback(self._background.discard)

    async def _return(self, tenant_id: str, lease: Lease) -> None:
        wait_s = lease.deadline_s + self.cfg.lease.return_grace_s / 2 - self.clock_s()
        # Past it, the requests still running go on as reservations.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, wait_s)):
                await lease.drained.wait()
        lease.sent = True
        await self._settle_call(tenant_id, lease.as_return(tenant_id), None)
        self._metrics.quota_leases.labels("returned").inc()

    def _in_background(self, tenant_id: str, call: QuotaCall, after: Lease | None) -> None:
        task = asyncio.create_task(self._settle_call(tenant_id, call, after))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_call(self, tenant_id: str, call: QuotaCall, after: Lease | None) -> None:
        if after is not None and after.returning is not None:
            # The request became a reservation with its lease's return: only
            # once that return is in may it be committed or released.
            await asyncio.shield(after.returning)
        try:
            await self._calls.call(tenant_id, call, timeout_s=SETTLE_PATIENCE_S)
        except QuotaUnavailable:
            self.counts["settle_lost"] += 1
            self._metrics.quota_settle_lost.inc()
            log.warning("quota %s for tenant %s not delivered; the shard will settle it "
                        "as fully used", type(call).__name__, tenant_id)

    async def _reap_forever(self) -> None:
        # Leases end on time even for a tenant that sends nothing more, so the
        # shard gets the unused part back before it would count it all as used.
        while True:
            await asyncio.sleep(self.cfg.lease.ttl_s / 4)
            now_s = self.clock_s()
            for key, lease in list(self._leases.items()):
                if now_s >= lease.deadline_s:
                    self._end(key, lease)
