"""A quota shard: the one owner of the ledgers (scheduler/quota_ledger.py) of
the tenants hashed onto it, answering calls on `yard.quota.<shard>`. Hosted
by a Ray actor (actors/ray_shells.py); plain asyncio here so it can be
tested on its own.

Durability: every change reaches Redis (actors/quota_store.py) before its
call is answered: the changed fields of the tenant's hash (a field per
charge, one for the period's spend) in one MULTI pipeline. Calls that arrive
while a write is under way share the next one (group commit). A ledger is
read back from that hash the first time its tenant is asked about, so a
restarted shard resets nothing, and a retried call finds the charge it made.

When that Redis fails (an error, or no answer within `quota.store_timeout_s`)
the shard answers every call with STORE_UNAVAILABLE at once, so ingresses
fail budgets closed fast and admit rate limits locally, and probes the Redis
every `quota.store_probe_s`; once it answers, a Redis that came back empty
gets every ledger held here in full before the shard answers again.

A Redis that lost the checkpoints (the shard's epoch key was gone when it
started, or went missing since) cannot tell a new tenant from one whose
ledger was lost: a tenant with a budget loaded from it is admitted only once
the metering service said what the tenant was billed this period (ClickHouse,
the truth), which raises the ledger's spend if higher, so it never counts
from 0. Meanwhile (asked in the background) its reservations are answered
SPEND_UNKNOWN, which fails them closed; a failed ask is made again by the
next one. A ledger held in memory when the Redis was lost is the truth: it
is written back in full."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
import redis.exceptions
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.bus import connect_bus
from actors.control_store import connect_redis
from actors.quota_store import QuotaStore, StoreUnavailable
from actors.tenancy_reader import TenancyReader
from analytics.metering_client import MeteringClient
from scheduler.billing import period_start_s
from scheduler.config import Config
from scheduler.errors import YardError
from scheduler.quota_ledger import TenantLedger
from scheduler.quota_terms import SPEND_UNKNOWN, STORE_UNAVAILABLE, Verdict, estimate
from scheduler.tenancy import TenantLimits, price_at
from scheduler.wire import (
    CONTROL_CHANGED_SUBJECT,
    QuotaCall,
    QuotaCommit,
    QuotaLeaseReturn,
    QuotaRelease,
    QuotaReply,
    QuotaReserve,
    control_changed_decoder,
    encode,
    quota_call_decoder,
    quota_subject,
)
from scheduler.wire.usage import UsageRowsQuery

log = logging.getLogger("switchyard.quota")
# What makes a call fail (and be resent) rather than crash the shard: the
# control store's limits and prices unreadable or malformed.
STORE_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError, msgspec.DecodeError,
                ValueError)
ROLLUP_MINUTE_MS = 60_000


class SpendUnknown(Exception):
    """The metering service did not say what a budget tenant spent."""


class _Tenant:
    def __init__(self, tenant_id: str, ledger: TenantLedger) -> None:
        self.tenant_id = tenant_id
        self.ledger = ledger
        # One write at a time; `version` counts changes, `saved` the ones in Redis.
        self.lock = asyncio.Lock()
        self.version = 0
        self.saved = 0
        # False: loaded from a Redis that lost checkpoints, so a budget needs
        # the billed spend first (asked by `learning`).
        self.spend_known = True
        self.learning: asyncio.Task[None] | None = None


class QuotaService:
    def __init__(self, cfg: Config, shard: int,
                 clock_s: Callable[[], float] = time.time) -> None:
        """`clock_s`: wall-clock seconds, as the ledgers persist times across restarts."""
        self.cfg = cfg
        self.shard = shard
        self.clock_s = clock_s
        self.counts = dict.fromkeys(("admitted", "refused", "leases", "commits", "releases",
                                     "lease_returns", "errors", "malformed", "writes",
                                     "unavailable", "store_down", "store_lost", "rewrites",
                                     "spend_reads", "spend_unknown"), 0)
        self._tenants: dict[str, _Tenant] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._nc: NATS | None = None
        self._reader: TenancyReader | None = None
        self._store = QuotaStore(cfg.quota, cfg.redis, shard)
        self._store_up = True
        # The Redis may have lost checkpoints: see the module's docstring.
        self._store_fresh = False
        self._watch: asyncio.Task[None] | None = None
        self._metering: MeteringClient | None = None

    async def start(self) -> None:
        self._reader = TenancyReader(connect_redis(self.cfg.redis), self.cfg.quota.cache_ttl_s)
        try:
            self._store_fresh = await self._store.claim_epoch()
        except StoreUnavailable as exc:
            self._store_down(exc)  # serves anyway: "unavailable" until its Redis is back
        self._nc = await connect_bus(self.cfg.nats, f"quota-{self.shard}")
        self._metering = MeteringClient(self._nc, timeout_s=self.cfg.quota.truth_timeout_s)
        await self._nc.subscribe(CONTROL_CHANGED_SUBJECT, cb=self._on_control_changed)
        await self._nc.subscribe(quota_subject(self.shard), cb=self._on_call)
        await self._nc.flush()

    async def aclose(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._answering:
            await asyncio.wait(self._answering, timeout=self.cfg.quota.store_timeout_s * 2)
        for task in self._answering:
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        await self._store.aclose()
        if self._reader is not None:
            await self._reader.redis.aclose()

    @property
    def store_up(self) -> bool:
        return self._store_up

    def stats(self) -> dict[str, int]:
        """Counts (refusals also by reason, `refused_<reason>`), and what the
        tenants known here hold open: reservations and leases, reserved nUSD."""
        ledgers = [t.ledger for t in self._tenants.values()]
        return {**self.counts, "tenants": len(self._tenants), "answering": len(self._answering),
                "store_up": int(self._store_up),
                "open_charges": sum(sum(c.open for c in ledger.charges.values())
                                    for ledger in ledgers),
                "reserved_nusd": sum(ledger.reserved_nusd for ledger in ledgers)}

    async def _on_control_changed(self, msg: Msg) -> None:
        assert self._reader is not None
        try:
            changed = control_changed_decoder.decode(msg.data)
        except msgspec.DecodeError:
            changed = None  # a newer peer's message: forget everything
        self._reader.forget(changed)

    async def _on_call(self, msg: Msg) -> None:
        # Runs one call at a time (one subscription): each tenant's calls
        # change its ledger in arrival order; only the writes overlap.
        try:
            call = quota_call_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.counts["malformed"] += 1
            log.warning("malformed quota call dropped")
            return
        if not self._store_up:
            self.counts["unavailable"] += 1
            await self._answer(msg.reply, QuotaReply(error=STORE_UNAVAILABLE))
            return
        try:
            tenant, reply = await self._apply(call)
        except StoreUnavailable as exc:
            self._store_down(exc)
            self.counts["unavailable"] += 1
            await self._answer(msg.reply, QuotaReply(error=STORE_UNAVAILABLE))
            return
        except SpendUnknown:
            await self._answer(msg.reply, QuotaReply(error=SPEND_UNKNOWN))
            return
        except STORE_ERRORS as exc:
            self.counts["errors"] += 1
            log.warning("quota call for tenant %s failed: %r", call.tenant_id, exc)
            await self._answer(msg.reply, QuotaReply(error=type(exc).__name__))
            return
        tenant.version += 1
        task = asyncio.create_task(self._save_then_answer(tenant, tenant.version, msg.reply,
                                                          reply))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _apply(self, call: QuotaCall) -> tuple[_Tenant, QuotaReply]:
        assert self._reader is not None
        limits = await self._reader.limits(call.tenant_id)
        tenant = await self._tenant(call.tenant_id)
        ledger, now_s = tenant.ledger, self.clock_s()
        ledger.advance(now_s, limits)
        if isinstance(call, QuotaReserve):
            if limits.budget_nusd and not tenant.spend_known:
                self._learn_spend(tenant, limits, now_s)
                raise SpendUnknown(call.tenant_id)
            price = price_at(await self._reader.prices(call.model), now_s)
            est = estimate(limits, price, call.prompt_tokens, call.max_tokens)
            # A resent call whose request was already reserved on its own
            # stays that reservation: a lease now would count it twice.
            lease = (ledger.grant_lease(call.lease_id, est, limits, self.cfg.quota.lease, now_s)
                     if call.lease_id and call.request_id not in ledger.charges else None)
            if lease is not None:
                self.counts["leases"] += 1
                return tenant, QuotaReply(
                    verdict=Verdict(numbers=ledger.numbers(limits, now_s)),
                    lease=msgspec.structs.replace(lease, price=price))
            verdict = ledger.reserve(call.request_id, est, limits, now_s)
            self.counts["admitted" if verdict.admitted else "refused"] += 1
            if not verdict.admitted:
                refused = f"refused_{verdict.refusal}"
                self.counts[refused] = self.counts.get(refused, 0) + 1
            return tenant, QuotaReply(verdict=verdict)
        if isinstance(call, QuotaCommit):
            price = price_at(await self._reader.prices(call.model), now_s)
            cost_nusd = 0 if price is None else price.cost_nusd(
                call.prompt_tokens, call.cached_tokens, call.completion_tokens)
            ledger.commit(call.request_id, call.prompt_tokens + call.completion_tokens,
                          cost_nusd, now_s)
            self.counts["commits"] += 1
        elif isinstance(call, QuotaRelease):
            ledger.release(call.request_id, now_s)
            self.counts["releases"] += 1
        elif isinstance(call, QuotaLeaseReturn):
            ledger.return_lease(call.lease_id, call.used_requests, call.used_tokens,
                                call.spent_nusd, call.still_open, now_s)
            self.counts["lease_returns"] += 1
        return tenant, QuotaReply()

    async def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            quota = self.cfg.quota
            fields = await self._store.load(tenant_id)
            ledger = TenantLedger.restore(fields, self.clock_s(), quota.retry_after_s,
                                          quota.lease.return_grace_s, quota.reservation_ttl_s)
            tenant = self._tenants[tenant_id] = _Tenant(tenant_id, ledger)
            tenant.spend_known = not self._store_fresh
        return tenant

    def _learn_spend(self, tenant: _Tenant, limits: TenantLimits, now_s: float) -> None:
        """Asks the metering service (once at a time per tenant) for the
        period's billed spend, which raises the ledger's if higher."""
        if tenant.learning is not None:
            return
        assert self._metering is not None
        metering = self._metering
        start_s = period_start_s(limits.budget_period, now_s)
        to_ms = (int(now_s * 1000) // ROLLUP_MINUTE_MS + 1) * ROLLUP_MINUTE_MS

        async def learn() -> None:
            self.counts["spend_reads"] += 1
            try:
                rows = await metering.usage_rows(UsageRowsQuery(
                    tenant_id=tenant.tenant_id, from_ms=start_s * 1000, to_ms=to_ms))
            except YardError as exc:
                self.counts["spend_unknown"] += 1
                log.warning("spend of tenant %s unknown, its budget fails closed: %s",
                            tenant.tenant_id, exc)
                return
            finally:
                tenant.learning = None
            tenant.ledger.spent_at_least(sum(row.cost_nusd for row in rows))
            tenant.spend_known = True

        tenant.learning = asyncio.create_task(learn(), name=f"quota-spend-{tenant.tenant_id}")
        self._answering.add(tenant.learning)
        tenant.learning.add_done_callback(self._answering.discard)

    async def _save_then_answer(self, tenant: _Tenant, version: int, reply_to: str,
                                reply: QuotaReply) -> None:
        try:
            await self._save(tenant, version)
        except StoreUnavailable as exc:
            self.counts["errors"] += 1
            self._store_down(exc)
            reply = QuotaReply(error=STORE_UNAVAILABLE)
        await self._answer(reply_to, reply)

    async def _save(self, tenant: _Tenant, version: int) -> None:
        assert self._reader is not None
        async with tenant.lock:
            if tenant.saved >= version:
                return  # a write that started after this change carried it
            target = tenant.version
            changes = tenant.ledger.take_changes()
            if changes:
                try:
                    await self._write(tenant.tenant_id, changes)
                except BaseException:
                    tenant.ledger.mark_unsaved(changes)
                    raise
            tenant.saved = target

    async def _write(self, tenant_id: str, changes: dict[str, bytes | None]) -> None:
        await self._store.write(tenant_id, changes)
        self.counts["writes"] += 1

    def _store_down(self, exc: BaseException) -> None:
        """Answers "unavailable" from now on until a probe finds the Redis back."""
        if not self._store_up:
            return
        self._store_up = False
        self.counts["store_down"] += 1
        log.warning("quota shard %d: its Redis failed (%r); answering unavailable until "
                    "it is back", self.shard, exc)
        self._watch = asyncio.create_task(self._watch_store(), name=f"quota-{self.shard}-store")

    async def _watch_store(self) -> None:
        rewrite = False  # until every ledger held here is back in the Redis
        while True:
            await asyncio.sleep(self.cfg.quota.store_probe_s)
            try:
                if await self._store.is_lost():
                    self.counts["store_lost"] += 1
                    self._store_fresh = rewrite = True
                    await self._store.claim_epoch()
                if rewrite:
                    await self._rewrite_all()
                break
            except StoreUnavailable:
                continue
        self._store_up = True
        log.warning("quota shard %d: its Redis is back", self.shard)

    async def _rewrite_all(self) -> None:
        """Every ledger held here, in full, into a Redis that lost them."""
        for tenant in list(self._tenants.values()):
            async with tenant.lock:
                target = tenant.version
                await self._store.rewrite(tenant.tenant_id, tenant.ledger.snapshot())
                tenant.saved = target
                self.counts["rewrites"] += 1

    async def _answer(self, reply_to: str, reply: QuotaReply) -> None:
        if not reply_to:
            return
        assert self._nc is not None
        try:
            await self._nc.publish(reply_to, encode(reply))
        except nats.errors.Error:
            # The ingress resends an unanswered call (idempotent).
            self.counts["errors"] += 1
