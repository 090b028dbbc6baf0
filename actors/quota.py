"""A quota shard: the one owner of the ledgers (scheduler/quota_ledger.py) of
the tenants hashed onto it, answering calls on `yard.quota.<shard>`. Hosted
by a Ray actor (actors/ray_shells.py); plain asyncio here so it can be
tested on its own.

Durability: every change reaches Redis before its call is answered: the
changed fields of the tenant's hash (`<quota.redis_prefix><tenant id>`: a
field per charge, one for the period's spend) in one MULTI pipeline. Calls
that arrive while a write is under way share the next one (group commit).
A ledger is read back from that hash the first time its tenant is asked
about, so a restarted shard resets nothing, and a retried call finds the
charge it made. A write that fails answers `error` (the ingress resends,
which is idempotent) and its fields go out again with the next write."""

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
from actors.tenancy_reader import TenancyReader
from scheduler.config import Config
from scheduler.quota_ledger import TenantLedger
from scheduler.quota_terms import Verdict, estimate
from scheduler.tenancy import price_at
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

log = logging.getLogger("switchyard.quota")
# What makes a call fail (and be resent) rather than crash the shard.
STORE_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError, msgspec.DecodeError,
                ValueError)


class _Tenant:
    def __init__(self, tenant_id: str, ledger: TenantLedger) -> None:
        self.tenant_id = tenant_id
        self.ledger = ledger
        # One write at a time; `version` counts changes, `saved` the ones in Redis.
        self.lock = asyncio.Lock()
        self.version = 0
        self.saved = 0


class QuotaService:
    def __init__(self, cfg: Config, shard: int,
                 clock_s: Callable[[], float] = time.time) -> None:
        """`clock_s`: wall-clock seconds, as the ledgers persist times across restarts."""
        self.cfg = cfg
        self.shard = shard
        self.clock_s = clock_s
        self.counts = dict.fromkeys(("admitted", "refused", "leases", "commits", "releases",
                                     "lease_returns", "errors", "malformed", "writes"), 0)
        self._tenants: dict[str, _Tenant] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._nc: NATS | None = None
        self._reader: TenancyReader | None = None

    async def start(self) -> None:
        self._reader = TenancyReader(connect_redis(self.cfg.redis), self.cfg.quota.cache_ttl_s)
        self._nc = await connect_bus(self.cfg.nats, f"quota-{self.shard}")
        await self._nc.subscribe(CONTROL_CHANGED_SUBJECT, cb=self._on_control_changed)
        await self._nc.subscribe(quota_subject(self.shard), cb=self._on_call)
        await self._nc.flush()

    async def aclose(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
        if self._answering:
            await asyncio.wait(self._answering, timeout=self.cfg.redis.timeout_s * 2)
        for task in self._answering:
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        if self._reader is not None:
            await self._reader.redis.aclose()

    def stats(self) -> dict[str, int]:
        """Counts (refusals also by reason, `refused_<reason>`), and what the
        tenants known here hold open: reservations and leases, reserved nUSD."""
        ledgers = [t.ledger for t in self._tenants.values()]
        return {**self.counts, "tenants": len(self._tenants), "answering": len(self._answering),
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
        try:
            tenant, reply = await self._apply(call)
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
        tenant = await self._tenant(call.tenant_id)
        limits = await self._reader.limits(call.tenant_id)
        ledger, now_s = tenant.ledger, self.clock_s()
        ledger.advance(now_s, limits)
        if isinstance(call, QuotaReserve):
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
            assert self._reader is not None
            quota = self.cfg.quota
            fields = await self._reader.redis.hgetall(quota.redis_prefix + tenant_id)
            ledger = TenantLedger.restore(fields, self.clock_s(), quota.retry_after_s,
                                          quota.lease.return_grace_s, quota.reservation_ttl_s)
            tenant = self._tenants[tenant_id] = _Tenant(tenant_id, ledger)
        return tenant

    async def _save_then_answer(self, tenant: _Tenant, version: int, reply_to: str,
                                reply: QuotaReply) -> None:
        try:
            await self._save(tenant, version)
        except STORE_ERRORS as exc:
            self.counts["errors"] += 1
            log.warning("quota state of tenant %s not saved: %r", tenant.tenant_id, exc)
            reply = QuotaReply(error=type(exc).__name__)
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
        assert self._reader is not None
        key = self.cfg.quota.redis_prefix + tenant_id
        puts = {field: value for field, value in changes.items() if value is not None}
        gone = [field for field, value in changes.items() if value is None]
        async with asyncio.timeout(self.cfg.redis.timeout_s):
            async with self._reader.redis.pipeline(transaction=True) as pipe:
                if puts:
                    pipe.hset(key, mapping=puts)  # type: ignore[arg-type]
                if gone:
                    pipe.hdel(key, *gone)
                await pipe.execute()
        self.counts["writes"] += 1

    async def _answer(self, reply_to: str, reply: QuotaReply) -> None:
        if not reply_to:
            return
        assert self._nc is not None
        try:
            await self._nc.publish(reply_to, encode(reply))
        except nats.errors.Error:
            # The ingress resends an unanswered call (idempotent).
            self.counts["errors"] += 1
