"""Webhooks against a real aiohttp receiver on loopback, real nats-server,
Redis (db 20) and the real MeteringService: usage records and budget alerts
arrive signed, at least once, through failing first attempts, a service
restart mid-delivery, and dead letters after the last attempt."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from aiohttp import web

from actors.control_plane import PRICES_KEY, ControlPlane
from actors.control_store import connect_redis
from analytics.metering import MeteringService
from analytics.webhooks import WebhookService
from deploy.procs import LOOPBACK, free_port
from scheduler.config import AuthConfig, Config, NatsConfig, RedisConfig, WebhooksConfig
from scheduler.control import SYSTEM
from scheduler.errors import ConfigError
from scheduler.tenancy import Price, TenantLimits
from scheduler.webhook_events import BUDGET_TYPE, USAGE_TYPE, verify
from scheduler.wire import UsageEvent
from tests.billing_stack import eventually, metering_config, publish
from tests.harness import nats_client, running_metering

pytestmark = pytest.mark.integration

WEBHOOK_REDIS_DB = 20
SECRET = "webhook-test-secret"
PRICE = Price(effective_from_s=0, input_nusd_per_token=1_000, cached_input_nusd_per_token=500,
              output_nusd_per_token=2_000)
# Each event costs 100 * 1000 + 100 * 2000 = 300_000 nUSD.
EVENT_COST_NUSD = 300_000


@dataclass
class Receiver:
    """Fails each event id's first `fail_first` attempts with 500 (always,
    for ids in `always_fail`); records every attempt and each 2xx body."""
    fail_first: int = 2
    always_fail: set[str] = field(default_factory=set)
    delay_s: float = 0.0
    attempts: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: collections.defaultdict(list))
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET.encode(), request.headers, body):
            self.bad_signatures += 1
            return web.Response(status=401)
        event_id = request.headers["webhook-id"]
        self.attempts[event_id] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if event_id in self.always_fail or self.attempts[event_id] <= self.fail_first:
            return web.Response(status=500)
        self.accepted[event_id].append(msgspec.json.decode(body))
        return web.Response(status=204)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    yield state, f"http://{LOOPBACK}:{port}/hook"
    await runner.cleanup()


@pytest_asyncio.fixture
async def cfg(private_bus: str, redis_url: str, tmp_path: Path,
              receiver: tuple[Receiver, str]) -> AsyncIterator[Config]:
    suffix = uuid.uuid4().hex[:8]
    base = Config(nats=NatsConfig(url=private_bus),
                  redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{WEBHOOK_REDIS_DB}"),
                  auth=AuthConfig(key_secret="webhook-test-key-secret-" + "0" * 24),
                  webhooks=WebhooksConfig(
                      url=receiver[1], secret=SECRET, timeout_s=1.0, max_attempts=4,
                      backoff_first_s=0.05, backoff_max_s=0.2, batch_max=50,
                      budget_check_interval_s=0.1, alert_stream=f"ALERTS_{suffix}",
                      dead_letter_stream=f"HOOK_DLQ_{suffix}"))
    redis = connect_redis(base.redis)
    await redis.flushdb()
    await redis.hset(PRICES_KEY, "tiny", msgspec.json.encode((PRICE,)))
    await redis.aclose()
    full = metering_config(base, tmp_path)
    yield full
    # The next test claims the same subjects with streams of its own.
    async with nats_client(private_bus) as nc:
        for stream in (full.nats.usage_stream, full.metering.dead_letter_stream,
                       full.webhooks.alert_stream, full.webhooks.dead_letter_stream):
            await nc.jetstream().delete_stream(stream)


@pytest_asyncio.fixture
async def metering(cfg: Config) -> AsyncIterator[MeteringService]:
    async with running_metering(cfg) as service:
        yield service


def events(tenant_id: str, n: int, prefix: str = "req") -> list[UsageEvent]:
    now_ms = int(time.time() * 1000)
    return [UsageEvent(request_id=f"{prefix}-{i}-{uuid.uuid4().hex[:6]}", tenant_id=tenant_id,
                       key_id="k1", model="tiny", prompt_tokens=100, completion_tokens=100,
                       ttft_ms=20.0, latency_ms=200.0, started_at_ms=now_ms - i)
            for i in range(n)]


async def test_usage_records_arrive_signed_at_least_once(
        cfg: Config, metering: MeteringService, receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    sent = events("acme", 120)
    service = WebhookService(cfg)
    async with nats_client(cfg.nats.url) as nc:
        await service.start()
        try:
            await publish(nc, sent)

            async def all_accepted() -> bool:
                return all(e.request_id in state.accepted for e in sent)

            await eventually(all_accepted, "every usage record to be accepted")
        finally:
            await service.aclose()
    assert state.bad_signatures == 0
    for e in sent:
        assert state.attempts[e.request_id] >= 3  # two 500s first
        record = state.accepted[e.request_id][0]
        assert (record["specversion"], record["type"], record["id"]) == (
            "1.0", USAGE_TYPE, e.request_id)
        assert record["data"]["cost_nusd"] == EVENT_COST_NUSD
        assert record["data"]["completion_tokens"] == 100
    assert service.stats()["delivered"] >= len(sent)


async def test_a_restart_mid_delivery_redelivers(
        cfg: Config, metering: MeteringService, receiver: tuple[Receiver, str]) -> None:
    """Stopped while its POSTs are in flight (nothing acked), a new service
    delivers every event once ack_wait has passed."""
    state, _ = receiver
    state.fail_first, state.delay_s = 0, 0.5
    sent = events("acme", 30)
    service = WebhookService(cfg)
    async with nats_client(cfg.nats.url) as nc:
        await service.start()
        try:
            await publish(nc, sent)

            async def in_flight() -> bool:
                return len(state.attempts) > 0

            await eventually(in_flight, "the first POSTs")
            await service.aclose()
            state.delay_s = 0.0
            service = WebhookService(cfg)
            await service.start()

            async def all_accepted() -> bool:
                return all(e.request_id in state.accepted for e in sent)

            await eventually(all_accepted, "every record after the restart")
        finally:
            await service.aclose()


async def test_the_last_failed_attempt_makes_a_dead_letter(
        cfg: Config, metering: MeteringService, receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    state.fail_first = 0
    doomed, fine = events("acme", 1, "doomed"), events("acme", 5, "fine")
    state.always_fail.add(doomed[0].request_id)
    service = WebhookService(cfg)
    async with nats_client(cfg.nats.url) as nc:
        await service.start()
        try:
            await publish(nc, doomed + fine)

            async def dead() -> bool:
                return service.stats()["dead_letters"] == 1

            await eventually(dead, "the dead letter")
            info = await nc.jetstream().stream_info(cfg.webhooks.dead_letter_stream)
            assert info.state.messages == 1
            assert state.attempts[doomed[0].request_id] == cfg.webhooks.max_attempts
            assert all(e.request_id in state.accepted for e in fine)
        finally:
            await service.aclose()


async def test_budget_alerts_fire_once_per_threshold(
        cfg: Config, metering: MeteringService, receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    service = WebhookService(cfg)
    async with connect_redis(cfg.redis) as redis, nats_client(cfg.nats.url) as nc:
        plane = ControlPlane(redis, cfg.auth, None)
        # A budget of 10 events' cost this month.
        tenant = await plane.create_tenant(SYSTEM, "test-budget", "budgeted", limits=TenantLimits(
            budget_nusd=10 * EVENT_COST_NUSD, budget_period="month"))
        await service.start()

        def alerts() -> dict[int, int]:
            """threshold -> 2xx deliveries"""
            return {r["data"]["threshold_pct"]: len(bodies) for bodies in state.accepted.values()
                    for r in bodies[:1] if r["type"] == BUDGET_TYPE}

        try:
            await publish(nc, events(tenant.tenant_id, 6))  # 60 %

            async def half() -> bool:
                return alerts() == {50: 1}

            await eventually(half, "the 50 % alert")
            await publish(nc, events(tenant.tenant_id, 5, "more"))  # 110 %

            async def all_three() -> bool:
                return alerts() == {50: 1, 80: 1, 100: 1}

            await eventually(all_three, "the 80 and 100 % alerts")
            # Many more checks: no threshold fires again this period.
            await asyncio.sleep(10 * cfg.webhooks.budget_check_interval_s)
            assert alerts() == {50: 1, 80: 1, 100: 1}
            assert service.stats()["alerts_raised"] == 3
            (body,) = [bodies[0] for bodies in state.accepted.values()
                       if bodies[0]["data"].get("threshold_pct") == 100]
            assert body["data"]["spent_nusd"] == 11 * EVENT_COST_NUSD
            assert body["subject"] == tenant.tenant_id
        finally:
            await service.aclose()


async def test_an_unsigned_webhook_does_not_start() -> None:
    service = WebhookService(Config(webhooks=WebhooksConfig(url="http://127.0.0.1:9/hook")))
    with pytest.raises(ConfigError, match="SWITCHYARD_WEBHOOK_SECRET"):
        await service.start()
