"""Metering against real chDB and nats-server: the store's dedup and
migrations, and the MeteringService from JetStream to totals over NATS."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio

from analytics.metering import MeteringService
from analytics.store import UsageStore, open_store
from deploy.procs import start_nats
from scheduler.config import ClickHouseConfig, Config, MeteringConfig, NatsConfig, RedisConfig
from scheduler.wire import (
    USAGE_QUERY_SUBJECT,
    UsageEvent,
    UsageQuery,
    UsageTotal,
    encode,
    usage_reply_decoder,
    usage_subject,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0
# This module's Redis database (prices; none are set here).
REDIS_DB = 16


def ch_config(tmp_path: Path) -> ClickHouseConfig:
    return ClickHouseConfig(interface="chdb", path=str(tmp_path / "chdb"), database="yard_test")


def event(i: int, tenant_id: str = "acme") -> UsageEvent:
    return UsageEvent(request_id=f"req-{tenant_id}-{i}", tenant_id=tenant_id, key_id="k1",
                      model="tiny", replica_id="r0", route="chat", prompt_tokens=100 + i,
                      cached_tokens=i % 7, completion_tokens=10 + i, ttft_ms=12.5,
                      latency_ms=80.0, started_at_ms=1_700_000_000_000 + i)


def expected_total(tenant_id: str, events: list[UsageEvent]) -> UsageTotal:
    mine = [e for e in events if e.tenant_id == tenant_id]
    return UsageTotal(tenant_id=tenant_id, requests=len(mine),
                      prompt_tokens=sum(e.prompt_tokens for e in mine),
                      cached_tokens=sum(e.cached_tokens for e in mine),
                      completion_tokens=sum(e.completion_tokens for e in mine))


def migrated_store(tmp_path: Path) -> UsageStore:
    store = open_store(ch_config(tmp_path), str(tmp_path))
    store.migrate()
    return store


# --- store (synchronous: the loop is not running while these bodies run) ----------


def test_store_insert_and_totals(tmp_path: Path) -> None:
    events = [event(i, "acme") for i in range(50)] + [event(i, "beta") for i in range(20)]
    store = migrated_store(tmp_path)
    try:
        store.insert(events, [0] * len(events), "token-1")
        assert store.totals(None) == (expected_total("acme", events),
                                      expected_total("beta", events))
        assert store.totals("beta") == (expected_total("beta", events),)
        assert store.totals("nobody") == ()
    finally:
        store.close()


def test_store_same_token_inserts_once(tmp_path: Path) -> None:
    events = [event(i) for i in range(30)]
    store = migrated_store(tmp_path)
    try:
        store.insert(events, [0] * 30, "same-token")
        store.insert(events, [0] * 30, "same-token")
        assert store.raw_row_count() == 30
        # A new token stores the rows again; FINAL still counts each request once.
        store.insert(events, [0] * 30, "other-token")
        assert store.raw_row_count() == 60
        assert store.totals("acme") == (expected_total("acme", events),)
    finally:
        store.close()


def test_migrations_idempotent(tmp_path: Path) -> None:
    store = open_store(ch_config(tmp_path), str(tmp_path))
    try:
        assert store.migrate() == [1, 2]
        store.insert([event(1)], [0], "t")
    finally:
        store.close()
    store = open_store(ch_config(tmp_path), str(tmp_path))
    try:
        assert store.migrate() == []
        rows = store.client.query(
            "SELECT version FROM yard_test.schema_migrations ORDER BY version").result_rows
        assert rows == [(1,), (2,)]
        assert store.totals(None) == (expected_total("acme", [event(1)]),)
    finally:
        store.close()


# --- the service ----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def private_nats_url(session_dir: Path) -> AsyncIterator[str]:
    """A nats-server of this module's own: the session stack (the `switchyard`
    fixture) already owns yard.usage.> and answers usage queries on the shared one."""
    proc, url = await start_nats(session_dir / "metering-nats", session_dir / "logs" / "metering")
    yield url
    await proc.stop()


@pytest_asyncio.fixture
async def metering_cfg(private_nats_url: str, redis_url: str,
                       tmp_path: Path) -> AsyncIterator[Config]:
    """A config with its own stream name; the stream is deleted afterwards so
    the next test can claim yard.usage.> again."""
    stream = f"USAGE_TEST_{uuid.uuid4().hex[:8]}"
    yield Config(var_dir=str(tmp_path),
                 nats=NatsConfig(url=private_nats_url, usage_stream=stream),
                 redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}"),
                 metering=MeteringConfig(batch_max=100, fetch_wait_s=0.2,
                                          dead_letter_stream=f"{stream}_DLQ",
                                          clickhouse=ch_config(tmp_path)))
    nc = await nats.connect(private_nats_url)
    try:
        await nc.jetstream().delete_stream(stream)
        await nc.jetstream().delete_stream(f"{stream}_DLQ")
    finally:
        await nc.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def query_totals(nc: nats.NATS, tenant_id: str | None) -> tuple[UsageTotal, ...]:
    msg = await nc.request(USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)),
                           timeout=2.0)
    reply = usage_reply_decoder.decode(msg.data)
    assert reply.error == ""
    return reply.totals


async def publish_events(nc: nats.NATS, events: list[UsageEvent]) -> list[bool]:
    """Publishes with Nats-Msg-Id = request id; returns each ack's duplicate flag."""
    js = nc.jetstream()
    acks = []
    # Many in flight, so the consumer meets bursts bigger than one fetch.
    for start in range(0, len(events), 100):
        acks += await asyncio.gather(*(
            js.publish(usage_subject(e.tenant_id), encode(e), headers={"Nats-Msg-Id": e.request_id})
            for e in events[start:start + 100]))
    return [ack.duplicate for ack in acks]


async def test_service_end_to_end(metering_cfg: Config) -> None:
    events = [event(i, "acme") for i in range(1500)] + [event(i, "beta") for i in range(500)]
    after_garbage = [event(i, "beta") for i in range(500, 510)]
    everything = events + after_garbage
    want = (expected_total("acme", everything), expected_total("beta", everything))
    service = MeteringService(metering_cfg)
    await service.start()
    nc = await nats.connect(metering_cfg.nats.url)
    try:
        assert not any(await publish_events(nc, events))
        # Retried publishes: the stream drops them by Nats-Msg-Id.
        assert all(await publish_events(nc, events[:20]))
        js = nc.jetstream()
        await js.publish(usage_subject("acme"), b"\x00not json")
        await js.publish(usage_subject("acme"), b'{"kind": "usage_query"}')
        await js.publish(usage_subject("acme"), encode(
            UsageEvent(request_id="neg", tenant_id="acme", key_id="k", model="m",
                       prompt_tokens=-1)))
        await publish_events(nc, after_garbage)

        async def counted() -> bool:
            return await query_totals(nc, None) == want and service.stats()["dead_letters"] == 3

        await eventually(counted, "totals over NATS to match what was published")
        assert await query_totals(nc, "beta") == want[1:]
        stats = service.stats()
        assert stats["inserted_rows"] == len(everything)
        assert stats["insert_failures"] == 0
    finally:
        await nc.close()
        await service.aclose()


async def test_service_retries_failed_insert(metering_cfg: Config,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    failures = [RuntimeError("store away")]
    real_insert = UsageStore.insert

    def flaky_insert(self: UsageStore, events: list[UsageEvent], costs: list[int],
                     token: str) -> None:
        if failures:
            raise failures.pop()
        real_insert(self, events, costs, token)

    monkeypatch.setattr(UsageStore, "insert", flaky_insert)
    events = [event(i) for i in range(40)]
    service = MeteringService(metering_cfg)
    await service.start()
    nc = await nats.connect(metering_cfg.nats.url)
    try:
        await publish_events(nc, events)

        async def stored() -> bool:
            return await query_totals(nc, None) == (expected_total("acme", events),)

        await eventually(stored, "the nak'd batch to be redelivered and stored")
        assert service.stats()["insert_failures"] >= 1
    finally:
        await nc.close()
        await service.aclose()


async def test_service_closes_promptly_after_bursts(metering_cfg: Config) -> None:
    """A fetch that times out while its batch still streams in leaves messages
    that nats-py never marks done; draining them would take its 30 s timeout."""
    cfg = msgspec.structs.replace(metering_cfg, metering=msgspec.structs.replace(
        metering_cfg.metering, batch_max=1000, fetch_wait_s=0.005))
    events = [event(i) for i in range(1000)]
    service = MeteringService(cfg)
    await service.start()
    nc = await nats.connect(cfg.nats.url)
    try:
        await publish_events(nc, events)

        async def stored() -> bool:
            return service.stats()["inserted_rows"] == len(events)

        await eventually(stored, "the burst to be stored")
    finally:
        await nc.close()
        # Not wait_for: nats-py's drain swallows the cancellation wait_for sends.
        started_s = time.monotonic()
        await service.aclose()
        assert time.monotonic() - started_s < 5.0


async def test_service_restart_consumes_backlog(metering_cfg: Config) -> None:
    """Events published while the service is down are stored after a restart,
    which also meets the existing stream and durable consumer with new settings."""
    first, backlog = [event(i) for i in range(10)], [event(i) for i in range(10, 25)]
    nc = await nats.connect(metering_cfg.nats.url)
    try:
        service = MeteringService(metering_cfg)
        await service.start()
        try:
            await publish_events(nc, first)

            async def first_stored() -> bool:
                return await query_totals(nc, None) == (expected_total("acme", first),)

            await eventually(first_stored, "the first events to be stored")
        finally:
            await service.aclose()
        await publish_events(nc, backlog)
        changed = msgspec.structs.replace(
            metering_cfg,
            nats=msgspec.structs.replace(metering_cfg.nats, duplicate_window_s=60.0),
            metering=msgspec.structs.replace(metering_cfg.metering, ack_wait_s=10.0))
        service = MeteringService(changed)
        await service.start()
        try:
            async def all_stored() -> bool:
                return await query_totals(nc, None) == (expected_total("acme", first + backlog),)

            await eventually(all_stored, "the backlog to be stored after the restart")
        finally:
            await service.aclose()
    finally:
        await nc.close()
