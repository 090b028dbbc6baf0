"""Metering against real chDB and nats-server: the store's dedup and
migrations, and the MeteringService from JetStream to totals over NATS."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio

from actors.control_plane import PRICES_KEY
from actors.control_store import connect_redis
from analytics import schema, usage_consumer
from analytics.metering import MeteringService
from analytics.rollup_repair import repair_rollups
from analytics.store import Columns, UsageStore, open_store, usage_columns
from analytics.usage_consumer import UsageConsumer
from deploy.procs import start_nats
from loadtests.jepsen.ambiguous_store import AmbiguousInsert, AmbiguousStore
from scheduler.config import ClickHouseConfig, Config, MeteringConfig, NatsConfig, RedisConfig
from scheduler.tenancy import Price
from scheduler.wire import (
    USAGE_QUERY_SUBJECT,
    UsageDeadLetter,
    UsageEvent,
    UsageQuery,
    UsageTotal,
    encode,
    usage_dead_letter_decoder,
    usage_decoder,
    usage_reply_decoder,
    usage_subject,
)
from tests.harness import nats_client, running_metering

pytestmark = pytest.mark.integration

QUERY_TIMEOUT_S = 10.0
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
        store.insert(usage_columns(events, [0] * len(events)), "token-1")
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
        store.insert(usage_columns(events, [0] * 30), "same-token")
        store.insert(usage_columns(events, [0] * 30), "same-token")
        assert store.raw_row_count() == 30
        # A new token stores the rows again; FINAL still counts each request once.
        store.insert(usage_columns(events, [0] * 30), "other-token")
        assert store.raw_row_count() == 60
        assert store.totals("acme") == (expected_total("acme", events),)
    finally:
        store.close()


def test_migrations_idempotent(tmp_path: Path) -> None:
    store = open_store(ch_config(tmp_path), str(tmp_path))
    try:
        assert store.migrate() == [1, 2]
        store.insert(usage_columns([event(1)], [0]), "t")
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


def rollup_sums(store: UsageStore) -> tuple[int, int, int, int]:
    """usage_minute's requests, prompt, completion and cost, all minutes and keys."""
    row = store.client.query(
        "SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost_nusd)"
        " FROM yard_test.usage_minute").result_rows[0]
    return tuple(int(v) for v in row)  # type: ignore[return-value]


def test_same_batch_twice_one_copy_in_raw_rows_and_rollups(tmp_path: Path) -> None:
    """The insert token dedups on chDB itself, without FINAL, and the view
    feeding usage_minute does not count the dropped insert either. The
    control, a copy of usage_raw without the dedup window, keeps both."""
    events = [event(i) for i in range(30)]
    costs = [7 * i for i in range(30)]
    store = migrated_store(tmp_path)
    try:
        store.insert(usage_columns(events, costs), "same-token")
        store.insert(usage_columns(events, costs), "same-token")
        assert store.raw_row_count() == 30
        assert rollup_sums(store) == (30, sum(e.prompt_tokens for e in events),
                                      sum(e.completion_tokens for e in events), sum(costs))
        store.client.command("CREATE TABLE yard_test.control AS yard_test.usage_raw")
        store.client.command(
            "ALTER TABLE yard_test.control MODIFY SETTING non_replicated_deduplication_window = 0")
        for _ in range(2):
            store.client.insert("control", [[e.request_id for e in events]],
                                database="yard_test", column_names=["request_id"],
                                column_oriented=True,
                                settings={"insert_deduplication_token": "same-token"})
        assert store.client.query("SELECT count() FROM yard_test.control").result_rows == [(60,)]
    finally:
        store.close()


class Draws:
    """A random source for AmbiguousStore: these draws, then never again below the ratio."""

    def __init__(self, *draws: float) -> None:
        self._draws = list(draws)

    def random(self) -> float:
        return self._draws.pop(0) if self._draws else 1.0


@pytest.mark.parametrize("lookup", [True, False], ids=["retry-looks-up", "control-no-lookup"])
def test_ambiguous_insert_then_retry_counts_once_in_the_rollup(tmp_path: Path, lookup: bool,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A batch's insert commits and then raises; so does the retry of the
    whole batch (deduplicated by its token), so the consumer splits it and
    inserts halves under new tokens. The retry looks every row up first, so
    the halves find their rows stored: usage_minute equals usage_raw FINAL.
    The control (a lookup that finds nothing, as before the fix) stores the
    halves again, and the rollup counts them twice while FINAL hides it."""
    events = [event(i) for i in range(30)]
    costs = [7 * i for i in range(30)]
    store = AmbiguousStore(migrated_store(tmp_path), 0.5, Draws(0.0, 0.0))  # type: ignore[arg-type]
    if not lookup:
        monkeypatch.setattr(UsageStore, "stored_request_ids", lambda *_: set())
    try:
        payload = usage_consumer.encode_batch(events, costs, [])
        with pytest.raises(AmbiguousInsert):
            usage_consumer.store_batch(store, payload)
        assert usage_consumer.isolate_failures(store, payload) == {}
        truth = (30, sum(e.prompt_tokens for e in events),
                 sum(e.completion_tokens for e in events), sum(costs))
        [final] = store.client.query(
            "SELECT count(), sum(prompt_tokens), sum(completion_tokens), sum(cost_nusd)"
            " FROM yard_test.usage_raw FINAL").result_rows
        assert tuple(final) == truth
        if lookup:
            assert store.raw_row_count() == 30
            assert rollup_sums(store) == truth
        else:
            assert store.raw_row_count() == 60
            assert rollup_sums(store) == tuple(2 * v for v in truth)
    finally:
        store.close()


def rollup_by_tenant(store: UsageStore, final: bool) -> dict[str, tuple[int, ...]]:
    """Per tenant: requests, prompt, completion and cost, from usage_raw FINAL
    (final) or usage_minute, with the rollup's merged TTFT quantiles."""
    sql = ("SELECT tenant_id, count(), sum(prompt_tokens), sum(completion_tokens),"
           " sum(cost_nusd) FROM yard_test.usage_raw FINAL GROUP BY tenant_id" if final else
           "SELECT tenant_id, sum(requests), sum(prompt_tokens), sum(completion_tokens),"
           " sum(cost_nusd), quantilesMerge(0.5, 0.99)(ttft_ms_quantiles)"
           " FROM yard_test.usage_minute GROUP BY tenant_id")
    return {row[0]: tuple(row[1:5]) + tuple(tuple(q) for q in row[5:])
            for row in store.client.query(sql).result_rows}


@pytest.mark.parametrize("repair", [True, False], ids=["repaired", "control-no-repair"])
def test_rows_stored_without_their_rollup_are_rolled_up_on_redelivery(
        tmp_path: Path, repair: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store killed between usage_raw and the view feeding usage_minute
    (detached here while acme's first rows go in) keeps raw rows without
    their rollup. The redelivered batch finds them stored and skips them,
    and rewrites acme's rollup from usage_raw FINAL, its fresh rows counted
    once; beta's rollup, whole, is left as it is. The control (no repair)
    keeps acme's rollup 20 requests short."""
    acme = [event(i) for i in range(30)]
    beta = [event(i, "beta") for i in range(10)]
    store = migrated_store(tmp_path)
    if not repair:
        monkeypatch.setattr(usage_consumer, "repair_rollups", lambda *_: 0)
    try:
        store.client.command("DETACH TABLE yard_test.usage_minute_mv")
        store.insert(usage_columns(acme[:20], [5] * 20), "first-acme")
        store.client.command("ATTACH TABLE yard_test.usage_minute_mv")
        store.insert(usage_columns(beta, [5] * 10), "first-beta")
        before_beta = rollup_by_tenant(store, final=False)["beta"]
        batch = acme + beta
        inserted, stored = usage_consumer.store_batch(store, usage_consumer.encode_batch(
            batch, [5] * len(batch), list(range(len(batch)))))
        assert (inserted, stored) == (10, 30)
        rollup, raw = rollup_by_tenant(store, final=False), rollup_by_tenant(store, final=True)
        assert rollup["beta"] == before_beta
        if repair:
            assert {t: r[:4] for t, r in rollup.items()} == raw
            assert rollup["acme"][4] == (12.5, 12.5)
            assert repair_rollups(store, ["acme"], [e.request_id for e in acme]) == 0
        else:
            assert rollup["acme"][0] == raw["acme"][0] - 20
    finally:
        store.close()


def test_stored_request_ids(tmp_path: Path) -> None:
    store = migrated_store(tmp_path)
    try:
        store.insert(usage_columns([event(1), event(2), event(3, "beta")], [0, 0, 0]), "t")
        asked = [event(1), event(2, "beta"), event(3, "beta"), event(4)]
        assert store.stored_request_ids([e.tenant_id for e in asked],
                                        [e.request_id for e in asked]) == {"req-acme-1",
                                                                            "req-beta-3"}
        assert store.stored_request_ids([], []) == set()
    finally:
        store.close()


def test_migration_2_on_a_store_at_version_1_with_rows(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of version 1 keep their tokens, get priority 0 and cost 0, and are
    backfilled into usage_minute once, even if the backfill runs again."""
    events = [event(i) for i in range(40)] + [event(i, "beta") for i in range(5)]
    store = open_store(ch_config(tmp_path), str(tmp_path))
    try:
        monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        assert store.migrate() == [1]
        v1_columns = ["request_id", "tenant_id", "key_id", "model", "prompt_tokens",
                      "cached_tokens", "completion_tokens", "status", "started_at"]
        store.client.insert("usage_raw", [
            [e.request_id for e in events], [e.tenant_id for e in events],
            [e.key_id for e in events], [e.model for e in events],
            [e.prompt_tokens for e in events], [e.cached_tokens for e in events],
            [e.completion_tokens for e in events], [500 if i % 10 == 0 else 200
                                                    for i in range(len(events))],
            [e.started_at_ms for e in events]], database="yard_test",
            column_names=v1_columns, column_oriented=True)
        monkeypatch.undo()
        assert store.migrate() == [2]
        assert store.totals("acme") == (expected_total("acme", events),)
        assert store.client.query(
            "SELECT sum(priority), sum(cost_nusd) FROM yard_test.usage_raw").result_rows == [(0, 0)]
        want = (45, sum(e.prompt_tokens for e in events),
                sum(e.completion_tokens for e in events), 0)
        assert rollup_sums(store) == want
        errors = store.client.query("SELECT sum(errors) FROM yard_test.usage_minute").result_rows
        assert errors == [(5,)]
        backfill = schema.MIGRATIONS[1][1][-1]
        store.client.command(backfill.format(db="yard_test"))
        assert rollup_sums(store) == want
        # New rows reach the rollup through the view.
        store.insert(usage_columns([event(100)], [9]), "t")
        assert rollup_sums(store) == (46, want[1] + event(100).prompt_tokens,
                                      want[2] + event(100).completion_tokens, 9)
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
    cfg = Config(var_dir=str(tmp_path),
                 nats=NatsConfig(url=private_nats_url, usage_stream=stream),
                 redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}"),
                 metering=MeteringConfig(batch_max=100, fetch_wait_s=0.2,
                                          dead_letter_stream=f"{stream}_DLQ",
                                          clickhouse=ch_config(tmp_path)))
    await set_prices(cfg, {})
    yield cfg
    async with nats_client(private_nats_url) as nc:
        await nc.jetstream().delete_stream(stream)
        await nc.jetstream().delete_stream(f"{stream}_DLQ")


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def query_totals(nc: nats.NATS, tenant_id: str | None) -> tuple[UsageTotal, ...]:
    # A query waits for the insert under way in the one store process, and a
    # fresh store process's first insert takes seconds on a loaded machine.
    msg = await nc.request(USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)),
                           timeout=QUERY_TIMEOUT_S)
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
    async with nats_client(metering_cfg.nats.url) as nc, running_metering(metering_cfg) as service:
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


_real_insert = UsageStore.insert
# Per process: the store process fails its first insert.
_flaky_failures = [RuntimeError("store away")]


def flaky_insert(self: UsageStore, columns: Columns, token: str) -> None:
    if _flaky_failures:
        raise _flaky_failures.pop()
    _real_insert(self, columns, token)


def refusing_insert(self: UsageStore, columns: Columns, token: str) -> None:
    if "poison" in columns[0]:
        raise ValueError("the store refuses this one")
    _real_insert(self, columns, token)


def _with_insert(insert: Callable[..., None], name: str, store: UsageStore,
                 *args: object) -> object:
    """Runs in the store process (where usage_consumer is not patched): its
    UsageStore.insert replaced, then usage_consumer's function `name`."""
    UsageStore.insert = insert  # type: ignore[method-assign]
    return getattr(usage_consumer, name)(store, *args)


def faulty_store(monkeypatch: pytest.MonkeyPatch, insert: Callable[..., None]) -> None:
    """The store process inserts with `insert`: the consumer's store calls
    travel by reference, so they are swapped for partials that patch there."""
    for name in ("store_batch", "isolate_failures"):
        monkeypatch.setattr(usage_consumer, name, functools.partial(_with_insert, insert, name))


async def test_service_retries_failed_insert(metering_cfg: Config,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    faulty_store(monkeypatch, flaky_insert)
    events = [event(i) for i in range(40)]
    async with nats_client(metering_cfg.nats.url) as nc, running_metering(metering_cfg) as service:
        await publish_events(nc, events)

        async def stored() -> bool:
            return await query_totals(nc, None) == (expected_total("acme", events),)

        await eventually(stored, "the nak'd batch to be redelivered and stored")
        assert service.stats()["insert_failures"] >= 1


async def test_service_closes_promptly_after_bursts(metering_cfg: Config) -> None:
    """A fetch that times out while its batch still streams in leaves messages
    that nats-py never marks done; draining them would take its 30 s timeout."""
    cfg = msgspec.structs.replace(metering_cfg, metering=msgspec.structs.replace(
        metering_cfg.metering, batch_max=1000, fetch_wait_s=0.005))
    events = [event(i) for i in range(1000)]
    service = MeteringService(cfg)
    async with nats_client(cfg.nats.url) as nc:
        await service.start()
        try:
            await publish_events(nc, events)

            async def stored() -> bool:
                return service.stats()["inserted_rows"] == len(events)

            await eventually(stored, "the burst to be stored")
        finally:
            # Not wait_for: nats-py's drain swallows the cancellation wait_for sends.
            started_s = time.monotonic()
            await service.aclose()
            assert time.monotonic() - started_s < 5.0


async def test_service_restart_consumes_backlog(metering_cfg: Config) -> None:
    """Events published while the service is down are stored after a restart,
    which also meets the existing stream and durable consumer with new settings."""
    first, backlog = [event(i) for i in range(10)], [event(i) for i in range(10, 25)]
    async with nats_client(metering_cfg.nats.url) as nc:
        async with running_metering(metering_cfg):
            await publish_events(nc, first)

            async def first_stored() -> bool:
                return await query_totals(nc, None) == (expected_total("acme", first),)

            await eventually(first_stored, "the first events to be stored")
        await publish_events(nc, backlog)
        changed = msgspec.structs.replace(
            metering_cfg,
            nats=msgspec.structs.replace(metering_cfg.nats, duplicate_window_s=60.0),
            metering=msgspec.structs.replace(metering_cfg.metering, ack_wait_s=10.0))
        async with running_metering(changed):
            async def all_stored() -> bool:
                return await query_totals(nc, None) == (expected_total("acme", first + backlog),)

            await eventually(all_stored, "the backlog to be stored after the restart")


# --- pricing, dead letters, lost acks, repeated publishes ---------------------------


def priced(events: list[UsageEvent], **changes: object) -> list[UsageEvent]:
    return [msgspec.structs.replace(e, **changes) for e in events]


async def read_store(cfg: Config, sql: str) -> list[tuple[object, ...]]:
    """Reads the chDB files once the service closed them (one engine per process)."""
    def read() -> list[tuple[object, ...]]:
        store = open_store(cfg.metering.clickhouse, cfg.var_dir)
        try:
            return [tuple(r) for r in store.client.query(sql).result_rows]
        finally:
            store.close()
    return await asyncio.to_thread(read)


async def set_prices(cfg: Config, prices: dict[str, tuple[Price, ...]]) -> None:
    """The control plane's layout: sy:prices maps model -> JSON array of Price."""
    async with connect_redis(cfg.redis) as redis:
        await redis.delete(PRICES_KEY)
        if prices:
            await redis.hset(PRICES_KEY, mapping={
                model: msgspec.json.encode(list(p)).decode() for model, p in prices.items()})


async def test_service_prices_each_event_at_its_start(metering_cfg: Config) -> None:
    switch_s = 1_700_000_000
    old = Price(effective_from_s=switch_s - 3600, input_nusd_per_token=150,
                cached_input_nusd_per_token=75, output_nusd_per_token=600)
    new = Price(effective_from_s=switch_s, input_nusd_per_token=300,
                cached_input_nusd_per_token=150, output_nusd_per_token=1_200)
    await set_prices(metering_cfg, {"tiny": (old, new)})
    before = priced([event(i) for i in range(20)], started_at_ms=(switch_s - 1) * 1000, priority=3)
    after = priced([event(i) for i in range(20, 50)], started_at_ms=switch_s * 1000, priority=-2)
    unpriced = priced([event(i) for i in range(50, 55)], model="nobody-priced-me")
    async with nats_client(metering_cfg.nats.url) as nc, running_metering(metering_cfg) as service:
        await publish_events(nc, before + after + unpriced)

        async def stored() -> bool:
            return service.stats()["inserted_rows"] == 55

        await eventually(stored, "the events to be stored")
        assert service.stats()["unpriced"] == 5
    rows = await read_store(metering_cfg, "SELECT model, priority, sum(cost_nusd), count()"
                            " FROM yard_test.usage_raw FINAL GROUP BY model, priority"
                            " ORDER BY model, priority")

    def cost(price: Price, events: list[UsageEvent]) -> int:
        return sum(price.cost_nusd(e.prompt_tokens, e.cached_tokens, e.completion_tokens)
                   for e in events)

    assert rows == [("nobody-priced-me", 0, 0, 5), ("tiny", -2, cost(new, after), 30),
                    ("tiny", 3, cost(old, before), 20)]
    minute = await read_store(metering_cfg, "SELECT sum(cost_nusd), sum(requests)"
                              " FROM yard_test.usage_minute")
    assert minute == [(cost(old, before) + cost(new, after), 55)]


async def dead_letters(nc: nats.NATS, stream: str) -> list[UsageDeadLetter]:
    js = nc.jetstream()
    count = (await js.stream_info(stream)).state.messages
    return [usage_dead_letter_decoder.decode((await js.get_msg(stream, seq)).data)
            for seq in range(1, count + 1)]


async def test_poison_events_are_dead_lettered_without_blocking_others(
        metering_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """An undecodable message goes at once; an event the store refuses goes
    after max_deliver deliveries; the rest of their batches is stored."""
    faulty_store(monkeypatch, refusing_insert)
    cfg = msgspec.structs.replace(metering_cfg, metering=msgspec.structs.replace(
        metering_cfg.metering, max_deliver=2))
    good = [event(i) for i in range(60)]
    poison = msgspec.structs.replace(event(999), request_id="poison")
    async with nats_client(cfg.nats.url) as nc, running_metering(cfg) as service:
        await nc.jetstream().publish(usage_subject("acme"), b"\x00garbage")
        await publish_events(nc, [*good[:30], poison, *good[30:]])

        async def settled() -> bool:
            return (await query_totals(nc, None) == (expected_total("acme", good),)
                    and service.stats()["dead_letters"] == 2)

        await eventually(settled, "good events stored, two dead letters")
        letters = await dead_letters(nc, cfg.metering.dead_letter_stream)
        assert [(d.stream_seq, d.deliveries) for d in letters] == [(1, 1), (32, 2)]
        assert letters[0].reason.startswith("undecodable")
        assert letters[0].payload == b"\x00garbage"
        assert "the store refuses this one" in letters[1].reason
        assert usage_decoder.decode(letters[1].payload) == poison
        assert service.stats()["insert_failures"] == 2


async def test_lost_ack_redelivery_is_stored_once(metering_cfg: Config,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer stored a batch but its acks never left (a crash between):
    the redelivered events are found stored and acked, with no second row."""
    real_settle = UsageConsumer._settle
    crashes = [RuntimeError("died before the ack")]

    async def settle_once_failing(self: UsageConsumer, *args: object) -> None:
        if crashes:
            raise crashes.pop()
        await real_settle(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(UsageConsumer, "_settle", settle_once_failing)
    cfg = msgspec.structs.replace(metering_cfg, metering=msgspec.structs.replace(
        metering_cfg.metering, ack_wait_s=1.0, batch_max=1000))
    events = [event(i) for i in range(50)]
    async with nats_client(cfg.nats.url) as nc, running_metering(cfg) as service:
        await publish_events(nc, events)

        async def redelivered() -> bool:
            # The crashed batch is counted only as found stored, on its return.
            stats = service.stats()
            return stats["already_stored"] > 0 and (
                stats["inserted_rows"] + stats["already_stored"] == 50)

        await eventually(redelivered, "the unacked batch to come back and be found stored")
        assert service.stats()["consume_errors"] == 1
    assert await read_store(cfg, "SELECT count(), uniqExact(request_id)"
                            " FROM yard_test.usage_raw") == [(50, 50)]


async def test_every_event_published_twice_is_one_row(metering_cfg: Config) -> None:
    """T27 short form. Inside the duplicate window the stream keeps one copy
    (the repeat's PubAck says duplicate); outside it the stream keeps both,
    and usage_raw FINAL still has one row per request id."""
    window_s = 1.0
    cfg = msgspec.structs.replace(metering_cfg, nats=msgspec.structs.replace(
        metering_cfg.nats, duplicate_window_s=window_s))
    events = [event(i) for i in range(200)]
    async with nats_client(cfg.nats.url) as nc, running_metering(cfg) as service:
        js = nc.jetstream()
        assert not any(await publish_events(nc, events))
        assert all(await publish_events(nc, events))
        assert (await js.stream_info(cfg.nats.usage_stream)).state.messages == 200
        # The window is the point here: nothing to await but the clock.
        await asyncio.sleep(window_s + 0.5)
        assert not any(await publish_events(nc, events))
        assert (await js.stream_info(cfg.nats.usage_stream)).state.messages == 400

        async def consumed() -> bool:
            return service.stats()["received"] == 400 and (
                await query_totals(nc, None) == (expected_total("acme", events),))

        await eventually(consumed, "both copies consumed")
    [(final, raw)] = await read_store(
        cfg, "SELECT (SELECT count() FROM yard_test.usage_raw FINAL),"
        " (SELECT count() FROM yard_test.usage_raw)")
    assert final == 200
    print(f"T27: stream copies 400, usage_raw rows {raw} (FINAL {final})")
