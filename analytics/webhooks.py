"""WebhookService: usage records and budget alerts to the configured webhook
as signed CloudEvents (scheduler/webhook_events.py), at least once.

Usage records come from a durable pull consumer of their own on the usage
stream (beside metering's), budget alerts from a durable consumer on the
alert stream. A message is acked only after a 2xx; otherwise it is nak'd
with a doubling delay, and after `max_attempts` deliveries it is copied to
the dead-letter stream and terminated. A crash before the ack redelivers,
so a receiver may see an event twice: the event id (a usage record's
request id) tells it so.

Budget alerts are computed from billed usage: every
`budget_check_interval_s` the service asks the metering service for each
tenant's spend in the current day and month, and each threshold (50, 80,
100 %) of a tenant's budget fires once per period: a Redis SET NX marks it
before the alert is published (and is removed again if the publish fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from actors.bus import connect_bus
from actors.control_plane import TENANT_KEY
from actors.control_store import connect_redis
from actors.tasks import cancel_and_wait
from analytics.metering_client import MeteringClient
from analytics.pricing import PriceReader, event_cost_nusd
from scheduler.billing import period_start_s
from scheduler.config import Config
from scheduler.errors import ConfigError
from scheduler.tenancy import NO_LIMITS, TenantLimits
from scheduler.webhook_events import (
    budget_cloudevent,
    crossed_thresholds,
    signed_headers,
    usage_cloudevent,
)
from scheduler.wire import (
    ALERT_SUBJECT,
    ALERT_SUBJECTS,
    DEAD_WEBHOOK_SUBJECT,
    USAGE_SUBJECTS,
    UsageEvent,
    encode,
    subject_token,
    usage_decoder,
)
from scheduler.wire.usage import BudgetAlert, UsageRowsQuery, budget_alert_decoder

log = logging.getLogger("switchyard.webhooks")

USAGE_CONSUMER = "yard-webhooks"
ALERT_CONSUMER = "yard-webhooks-alerts"
FETCH_WAIT_S = 0.5
CONSUME_RETRY_S = 1.0
# A mark outlives the longest budget period (a month) it stands for.
ALERT_MARK_TTL_S = 35 * 86_400
ALERT_MARK_KEY = "sy:budget-alert:{tenant}:{period}:{start}:{pct}"
# Spend of the minute now running is in the rollup too.
ROLLUP_MINUTE_MS = 60_000
BUDGET_PERIODS = ("day", "month")

_limits_decoder = msgspec.json.Decoder(TenantLimits)
_json = msgspec.json.Encoder()

# (message, its CloudEvent; None: undecodable, terminated)
Prepared = list[tuple[Msg, dict[str, Any] | None]]


class WebhookService:
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        self._secret = cfg.webhooks.secret.encode()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._redis: aioredis.Redis | None = None
        self._http: aiohttp.ClientSession | None = None
        self._metering: MeteringClient | None = None
        self._prices: PriceReader | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._counts = dict.fromkeys(
            ("delivered", "failed_attempts", "dead_letters", "rejected", "alerts_raised",
             "consume_errors", "budget_check_errors"), 0)

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    async def start(self) -> None:
        """Ensures the alert and dead-letter streams and both consumers (the
        usage stream is metering's: it must exist), then delivers."""
        w = self.cfg.webhooks
        if not w.url or not w.secret:
            raise ConfigError("webhooks.url and webhooks.secret (SWITCHYARD_WEBHOOK_SECRET) "
                              "must both be set to deliver webhooks")
        try:
            self._nc = await connect_bus(self.cfg.nats, "switchyard-webhooks")
            self._js = self._nc.jetstream(timeout=self.cfg.nats.request_timeout_s)
            for name, subjects in ((w.alert_stream, ALERT_SUBJECTS),
                                   (w.dead_letter_stream, DEAD_WEBHOOK_SUBJECT.format(kind=">"))):
                await self._js.add_stream(StreamConfig(
                    name=name, subjects=[subjects], storage=StorageType.FILE,
                    duplicate_window=self.cfg.nats.duplicate_window_s))
            usage = await self._bind(self.cfg.nats.usage_stream, USAGE_SUBJECTS, USAGE_CONSUMER)
            alerts = await self._bind(w.alert_stream, ALERT_SUBJECTS, ALERT_CONSUMER)
            self._redis = connect_redis(self.cfg.redis)
            self._prices = PriceReader(self._redis)
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=w.timeout_s))
            self._metering = MeteringClient(self._nc)
        except BaseException:
            await self.aclose()
            raise
        self._tasks = [
            asyncio.create_task(self._consume_forever(usage, self._usage_events),
                                name="webhooks-usage"),
            asyncio.create_task(self._consume_forever(alerts, self._alert_events),
                                name="webhooks-alerts"),
            asyncio.create_task(self._check_budgets_forever(), name="webhooks-budgets")]

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._nc is not None and not self._nc.is_closed:
            # Unacked messages come back after ack_wait; nothing to drain.
            await self._nc.close()
        self._nc = None

    async def _bind(self, stream: str, subjects: str, durable: str
                    ) -> JetStreamContext.PullSubscription:
        assert self._js is not None
        w = self.cfg.webhooks
        # Deliveries are bounded here (dead letters), not by JetStream, which
        # would drop the message silently after max_deliver.
        ack_wait_s = 2 * w.timeout_s + w.backoff_max_s
        await self._js.add_consumer(stream, ConsumerConfig(
            durable_name=durable, name=durable, filter_subject=subjects,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s, max_deliver=-1,
            max_ack_pending=4 * w.batch_max))
        return await self._js.pull_subscribe_bind(durable=durable, stream=stream)

    # --- delivery ---------------------------------------------------------------------

    async def _consume_forever(self, sub: JetStreamContext.PullSubscription,
                               prepare: Callable[[list[Msg]], Awaitable[Prepared]]) -> None:
        while True:
            try:
                msgs = await sub.fetch(batch=self.cfg.webhooks.batch_max, timeout=FETCH_WAIT_S)
            except TimeoutError:
                continue
            except Exception:
                self._counts["consume_errors"] += 1
                log.warning("webhook consumer failed; retrying", exc_info=True)
                await asyncio.sleep(CONSUME_RETRY_S)
                continue
            try:
                prepared = await prepare(msgs)
            except Exception:
                self._counts["consume_errors"] += 1
                log.warning("could not build %d webhook events; retrying", len(msgs),
                            exc_info=True)
                for msg in msgs:
                    await msg.nak(delay=self._backoff_s(msg))
                continue
            # Each delivery settles its own message; one failing (NATS away
            # while acking, say) must not stop the others or this loop: its
            # message comes back after ack_wait.
            results = await asyncio.gather(*(self._deliver(msg, event) for msg, event in prepared),
                                           return_exceptions=True)
            for failed in (r for r in results if isinstance(r, Exception)):
                self._counts["consume_errors"] += 1
                log.warning("webhook delivery failed: %r", failed)

    def _backoff_s(self, msg: Msg) -> float:
        w = self.cfg.webhooks
        return min(w.backoff_max_s, w.backoff_first_s * 2 ** max(0, msg.metadata.num_delivered - 1))

    async def _deliver(self, msg: Msg, event: dict[str, Any] | None) -> None:
        if event is None:
            self._counts["rejected"] += 1
            await msg.term()
            return
        body = _json.encode(event)
        if await self._post(event["id"], body):
            self._counts["delivered"] += 1
            await msg.ack()
            return
        self._counts["failed_attempts"] += 1
        if msg.metadata.num_delivered < self.cfg.webhooks.max_attempts:
            await msg.nak(delay=self._backoff_s(msg))
            return
        assert self._js is not None
        try:
            subject = DEAD_WEBHOOK_SUBJECT.format(kind=subject_token(event["type"]))
            await self._js.publish(subject, body, headers={"Nats-Msg-Id": f"dead-{event['id']}"})
        except Exception:
            log.warning("could not dead-letter webhook event %s", event["id"], exc_info=True)
            await msg.nak(delay=self._backoff_s(msg))
            return
        self._counts["dead_letters"] += 1
        log.warning("webhook event %s is a dead letter after %d attempts", event["id"],
                    msg.metadata.num_delivered)
        await msg.term()

    async def _post(self, event_id: str, body: bytes) -> bool:
        assert self._http is not None
        headers = signed_headers(self._secret, event_id, int(self._clock()), body)
        try:
            async with self._http.post(self.cfg.webhooks.url, data=body, headers=headers) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("webhook POST of %s failed: %r", event_id, exc)
            return False

    async def _usage_events(self, msgs: list[Msg]) -> Prepared:
        events: list[UsageEvent | None] = []
        for msg in msgs:
            try:
                events.append(usage_decoder.decode(msg.data))
            except msgspec.DecodeError:
                events.append(None)
        assert self._prices is not None
        prices = await self._prices.for_events([e for e in events if e is not None])
        source = self.cfg.webhooks.source
        prepared: Prepared = []
        for msg, event in zip(msgs, events, strict=True):
            # As billed at ingest: the price in effect when it started (0 unpriced).
            prepared.append((msg, None if event is None else usage_cloudevent(
                event, event_cost_nusd(event, prices) or 0, source)))
        return prepared

    async def _alert_events(self, msgs: list[Msg]) -> Prepared:
        prepared: Prepared = []
        for msg in msgs:
            try:
                alert = budget_alert_decoder.decode(msg.data)
            except msgspec.DecodeError:
                prepared.append((msg, None))
                continue
            prepared.append((msg, budget_cloudevent(alert, self.cfg.webhooks.source)))
        return prepared

    # --- budget alerts ----------------------------------------------------------------

    async def _check_budgets_forever(self) -> None:
        while True:
            try:
                await self.check_budgets()
            except Exception:
                self._counts["budget_check_errors"] += 1
                log.warning("budget check failed; next in %g s",
                            self.cfg.webhooks.budget_check_interval_s, exc_info=True)
            await asyncio.sleep(self.cfg.webhooks.budget_check_interval_s)

    async def check_budgets(self) -> None:
        """Raises the alerts due now (each threshold once per period)."""
        assert self._metering is not None
        now_s = self._clock()
        for period in BUDGET_PERIODS:
            start_s = period_start_s(period, now_s)
            rows = await self._metering.usage_rows(UsageRowsQuery(
                from_ms=start_s * 1000, to_ms=int(now_s * 1000) + ROLLUP_MINUTE_MS))
            for row in rows:
                limits = await self._limits(row.tenant_id)
                if limits.budget_period != period:
                    continue
                for pct in crossed_thresholds(row.cost_nusd, limits.budget_nusd):
                    await self._raise_alert(BudgetAlert(
                        tenant_id=row.tenant_id, period=period, period_start_s=start_s,
                        threshold_pct=pct, budget_nusd=limits.budget_nusd,
                        spent_nusd=row.cost_nusd, at_s=int(now_s)))

    async def _limits(self, tenant_id: str) -> TenantLimits:
        assert self._redis is not None
        raw = await self._redis.hget(TENANT_KEY.format(tenant_id=tenant_id), "limits")
        return NO_LIMITS if raw is None else _limits_decoder.decode(raw)

    async def _raise_alert(self, alert: BudgetAlert) -> None:
        assert self._redis is not None and self._js is not None
        mark = ALERT_MARK_KEY.format(tenant=alert.tenant_id, period=alert.period,
                                     start=alert.period_start_s, pct=alert.threshold_pct)
        if not await self._redis.set(mark, alert.event_id, nx=True, ex=ALERT_MARK_TTL_S):
            return
        try:
            await self._js.publish(ALERT_SUBJECT.format(tenant=subject_token(alert.tenant_id)),
                                   encode(alert), headers={"Nats-Msg-Id": alert.event_id})
        except BaseException:
            # Not published: the next check raises it again.
            with contextlib.suppress(Exception):
                await self._redis.delete(mark)
            raise
        self._counts["alerts_raised"] += 1

