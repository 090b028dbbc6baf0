"""T28 short form: the metering consumer, a process of its own, SIGKILLed at
random points (so before an insert, between an insert and its acks, after
the acks) while a generator publishes 20,000 usage events. ClickHouse ends
with one FINAL row per request id and the generator's token and cost sums."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from pathlib import Path

import msgspec
import pytest

from analytics.store import open_store
from deploy.procs import ChildProcess, child_env, python_module, start_nats
from scheduler.config import (
    ClickHouseConfig,
    Config,
    MeteringConfig,
    NatsConfig,
    RedisConfig,
    dump_config,
)
from scheduler.tenancy import Price
from scheduler.wire import UsageEvent, encode, usage_subject
from tests.harness import nats_client
from tests.test_metering import set_prices

pytestmark = pytest.mark.integration

EVENTS = 20_000
PUBLISH_S = 6.0
KILLS = 4
# Each kill waits for its phase, in turn, to strike there.
TARGETS = ("before-insert", "before-ack", "after-ack")
PHASE_WAIT_S = 5.0
REDIS_DB = 17
PRICE = Price(effective_from_s=0, input_nusd_per_token=150, cached_input_nusd_per_token=75,
              output_nusd_per_token=600)
DRAIN_TIMEOUT_S = 60.0


def generated(rng: random.Random) -> list[UsageEvent]:
    return [UsageEvent(request_id=f"req-{i:06d}", tenant_id=f"t{i % 5}", key_id=f"k{i % 11}",
                       model="tiny", replica_id=f"r{i % 3}", route="chat",
                       prompt_tokens=rng.randint(1, 4_000), cached_tokens=rng.randint(0, 1),
                       completion_tokens=rng.randint(0, 1_000), ttft_ms=rng.uniform(5, 500),
                       latency_ms=rng.uniform(50, 5_000), priority=rng.randint(-5, 5))
            for i in range(EVENTS)]


async def publish_steadily(url: str, events: list[UsageEvent]) -> None:
    """At a steady rate over PUBLISH_S; each event stamped with its publish time."""
    async with nats_client(url) as nc:
        js = nc.jetstream()
        chunk = 100
        pause_s = PUBLISH_S * chunk / len(events)
        for start in range(0, len(events), chunk):
            now_ms = int(time.time() * 1000)
            part = events[start:start + chunk]
            events[start:start + chunk] = [msgspec.structs.replace(e, started_at_ms=now_ms)
                                           for e in part]
            await asyncio.gather(*(
                js.publish(usage_subject(e.tenant_id), encode(e),
                           headers={"Nats-Msg-Id": e.request_id})
                for e in events[start:start + chunk]))
            await asyncio.sleep(pause_s)


async def start_consumer(config_path: Path, log_path: Path, seed: int) -> ChildProcess:
    proc = ChildProcess("metering", python_module("tests.metering_phases", str(config_path),
                                                  str(seed)), log_path, env=child_env())
    offset = log_path.stat().st_size if log_path.exists() else 0

    async def ready() -> bool:
        return "metering ready" in log_path.read_text(errors="replace")[offset:]

    await proc.start()
    await proc.wait_ready(ready, timeout_s=60)
    return proc


async def drained(url: str, cfg: Config) -> bool:
    async with nats_client(url) as nc:
        info = await nc.jetstream().consumer_info(cfg.nats.usage_stream, "yard-metering")
        stream = await nc.jetstream().stream_info(cfg.nats.usage_stream)
    return (stream.state.messages == EVENTS and info.num_pending == 0
            and info.num_ack_pending == 0)


async def test_consumer_killed_at_random_points_bills_each_request_once(
        tmp_path: Path, redis_url: str) -> None:
    rng = random.Random(28)
    nats_proc, url = await start_nats(tmp_path / "nats", tmp_path / "logs")
    cfg = Config(var_dir=str(tmp_path), nats=NatsConfig(url=url),
                 redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}"),
                 metering=MeteringConfig(batch_max=1000, fetch_wait_s=0.05, ack_wait_s=2.0,
                                         clickhouse=ClickHouseConfig(path=str(tmp_path / "ch"))))
    await set_prices(cfg, {"tiny": (PRICE,)})
    config_path = tmp_path / "metering.json"
    config_path.write_bytes(dump_config(cfg))
    log_path = tmp_path / "logs" / "metering.log"
    events = await asyncio.to_thread(generated, rng)
    starts_s: list[float] = []
    began_s = time.monotonic()
    struck: list[str] = []
    try:
        consumer = await start_consumer(config_path, log_path, 0)
        generator = asyncio.create_task(publish_steadily(url, events))
        try:
            for kills in range(1, KILLS + 1):
                await asyncio.sleep(rng.uniform(0.1, 0.4))
                await kill_at(consumer, log_path, TARGETS[kills % len(TARGETS)])
                struck.append(last_phase(log_path.read_text()))
                started_s = time.monotonic()
                consumer = await start_consumer(config_path, log_path, kills)
                starts_s.append(time.monotonic() - started_s)
        finally:
            await generator
        published_s = time.monotonic() - began_s
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not await drained(url, cfg):
            assert time.monotonic() < deadline, "the consumer did not drain the stream"
            await asyncio.sleep(0.2)
        drained_s = time.monotonic() - began_s
        await consumer.stop()
    finally:
        await nats_proc.stop()
    log = await asyncio.to_thread(log_path.read_text)
    found_stored = sum(int(n) for n in re.findall(
        r"(\d+) redelivered events were stored already", log))
    final, raw, unique, prompt, cached, completion, cost, lag_p99_ms = await asyncio.to_thread(
        read_totals, cfg)
    print(f"\nT28: {KILLS} kills, after phases {struck}; rows FINAL {final}, raw {raw},"
          f" uniqExact {unique}; redeliveries found stored {found_stored}; ingest lag p99"
          f" {lag_p99_ms:.0f} ms; restarts took {[round(s, 1) for s in starts_s]} s;"
          f" published by {published_s:.1f} s, drained by {drained_s:.1f} s")
    assert final == unique == EVENTS
    assert (prompt, cached, completion, cost) == await asyncio.to_thread(truth, events)
    assert lag_p99_ms < 30_000


def truth(events: list[UsageEvent]) -> tuple[int, int, int, int]:
    """The generator's token and cost sums."""
    return (sum(e.prompt_tokens for e in events), sum(e.cached_tokens for e in events),
            sum(e.completion_tokens for e in events),
            sum(PRICE.cost_nusd(e.prompt_tokens, e.cached_tokens, e.completion_tokens)
                for e in events))


def last_phase(log: str) -> str:
    """Where the consumer is: before an insert, after it before the acks, or after them."""
    phases = re.findall(r"^phase (\w+)$", log, re.MULTILINE)
    return {"fetched": "before-insert", "inserted": "before-ack", "acked": "after-ack"}.get(
        phases[-1] if phases else "", "idle")


async def kill_at(consumer: ChildProcess, log_path: Path, target: str) -> None:
    """SIGKILLs the consumer once its log says it reached `target` (or after
    a few seconds in whatever phase it is, should it be idle)."""
    deadline = time.monotonic() + PHASE_WAIT_S
    with log_path.open() as log:
        log.seek(0, 2)
        seen = ""
        while time.monotonic() < deadline:
            seen = (seen + log.read())[-4_096:]
            if last_phase(seen) == target:
                break
            await asyncio.sleep(0.005)
    assert consumer.proc is not None
    consumer.proc.send_signal(signal.SIGKILL)
    await consumer.proc.wait()


def read_totals(cfg: Config) -> tuple[int, ...]:
    store = open_store(cfg.metering.clickhouse, cfg.var_dir)
    try:
        db = cfg.metering.clickhouse.database
        [row] = store.client.query(
            f"SELECT (SELECT count() FROM {db}.usage_raw FINAL),"
            f" (SELECT count() FROM {db}.usage_raw),"
            f" (SELECT uniqExact(request_id) FROM {db}.usage_raw),"
            f" sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), sum(cost_nusd),"
            f" quantile(0.99)(toUnixTimestamp64Milli(ingested_at)"
            f" - toUnixTimestamp64Milli(started_at))"
            f" FROM {db}.usage_raw FINAL").result_rows
        return tuple(row)
    finally:
        store.close()
