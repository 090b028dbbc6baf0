"""The ingress's calls to the quota shards (router/quota_client.py): each
call resent until its bound, the shards' breakers (router/quota_outage.py)
opened by a failed admission and closed by any answer, and the probes of a
shard whose breaker is open."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from router.metrics import Metrics
from router.quota_outage import OutageDesk
from scheduler.errors import QuotaUnavailable
from scheduler.quota_outage import ShardBreaker
from scheduler.quota_terms import SPEND_UNKNOWN, STORE_UNAVAILABLE, QuotaConfig
from scheduler.wire import (
    QuotaCall,
    QuotaCommit,
    QuotaLeaseReturn,
    QuotaRelease,
    QuotaReply,
    QuotaReserve,
    encode,
    quota_reply_decoder,
    quota_subject,
)

# Pause before resending to a shard with no subscriber (it is restarting).
NO_RESPONDERS_BACKOFF_S = 0.02
_CALL_LABELS: dict[type[QuotaCall], str] = {
    QuotaReserve: "reserve", QuotaCommit: "commit", QuotaRelease: "release",
    QuotaLeaseReturn: "lease_return"}


class ShardCalls:
    def __init__(self, nc: NATS, cfg: QuotaConfig, metrics: Metrics, outage: OutageDesk,
                 counts: dict[str, int],
                 spawn: Callable[[Coroutine[None, None, None]], None],
                 on_back: Callable[[int, ShardBreaker], None]) -> None:
        """`counts`: the client's (calls, unavailable); `spawn` owns a
        background task; `on_back(shard, breaker)`: the shard answered."""
        self._nc = nc
        self.cfg = cfg
        self._metrics = metrics
        self._outage = outage
        self.counts = counts
        self._spawn = spawn
        self._on_back = on_back

    async def call(self, tenant_id: str, call: QuotaCall,
                   timeout_s: float | None = None) -> QuotaReply:
        """The shard's answer, resending the same call until `timeout_s`. An
        admission that fails opens the shard's breaker; any answer closes it."""
        shard, breaker = self._outage.breaker(tenant_id)
        admitting = isinstance(call, QuotaReserve)
        try:
            reply = await self.ask(shard, call, timeout_s or self.cfg.call_timeout_s, admitting)
        except QuotaUnavailable:
            if admitting:
                self._outage.failed(shard, breaker)
            raise self.unavailable(tenant_id, admitting) from None
        self._on_back(shard, breaker)
        return reply

    async def ask(self, shard: int, call: QuotaCall, timeout_s: float,
                  admitting: bool) -> QuotaReply:
        """Resends until `timeout_s`; an admission (`admitting`) also stops
        at the shard's word that its Redis is away. A shard still learning a
        budget tenant's spend is asked again; at the bound its last answer
        (SPEND_UNKNOWN) is returned: the shard is there, its breaker stays
        closed."""
        loop = asyncio.get_running_loop()
        last: QuotaReply | None = None
        started_s = loop.time()
        deadline_s = started_s + timeout_s
        subject = quota_subject(shard)
        payload = encode(call)
        took = self._metrics.quota_call_duration.labels(_CALL_LABELS[type(call)])
        while (left_s := deadline_s - loop.time()) > 0:
            self.counts["calls"] += 1
            try:
                msg = await self._nc.request(subject, payload,
                                             timeout=min(left_s, self.cfg.attempt_timeout_s))
                reply = quota_reply_decoder.decode(msg.data)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(min(NO_RESPONDERS_BACKOFF_S, max(0.0, left_s)))
                continue
            except (nats.errors.Error, msgspec.DecodeError):
                continue
            if not reply.error:
                took.observe(loop.time() - started_s)
                return reply
            if reply.error == SPEND_UNKNOWN:
                last = reply
            if reply.error == STORE_UNAVAILABLE:
                last = None
                if admitting:
                    break  # no use resending while its Redis is away
                await asyncio.sleep(min(self.cfg.store_probe_s, max(0.0, left_s)))
                continue
            await asyncio.sleep(min(NO_RESPONDERS_BACKOFF_S, max(0.0, left_s)))
        if last is not None:
            return last
        raise QuotaUnavailable("The quota service did not answer in time.",
                               retry_after_s=self.cfg.retry_after_s)

    def unavailable(self, tenant_id: str, admitting: bool) -> QuotaUnavailable:
        self.counts["unavailable"] += 1
        if admitting:
            self._metrics.quota_unavailable.inc()
        return QuotaUnavailable("The quota service did not answer in time.",
                                retry_after_s=self.cfg.retry_after_s, tenant_id=tenant_id)

    def probe(self, shard: int, breaker: ShardBreaker, tenant_id: str) -> None:
        """Asks the shard in the background whether it answers again (a
        release of nothing: it changes nothing, and fails while its Redis is
        away); the admissions meanwhile do not wait for it."""
        self._outage.counts["probes"] += 1

        async def probe() -> None:
            try:
                await self.ask(shard, QuotaRelease(tenant_id=tenant_id,
                                                   request_id="probe-" + uuid.uuid4().hex),
                               self.cfg.call_timeout_s, admitting=True)
            except QuotaUnavailable:
                self._outage.failed(shard, breaker)
                return
            self._on_back(shard, breaker)

        self._spawn(probe())

