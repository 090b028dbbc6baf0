"""Metering throughput and ingest lag: the real consumer (`python -m
analytics.metering_main`, its own process) over real nats-server and
redis-server on free loopback ports, into chDB.

throughput: `--events` usage events are published while the consumer is
down; it is then started, and the rate is the events over the time from its
first insert to the stream fully acked (start-up excluded; read from the
consumer's state in NATS, and the rows checked in ClickHouse afterwards).
lag: events published at a steady `--rate` for `--seconds` while the consumer
runs, each stamped with its publish time; lag is ClickHouse's `ingested_at`
(the insert) minus that stamp, so it holds the wait in the stream, the fetch,
the insert and nothing else. Both report the consumer's worst event-loop
stall (its `loop_stall_max_ms`, printed by the process as it stops): the
store lives in a process of its own, so NATS pings, acks and usage queries
keep being served while it inserts. Prints JSON and a short table.

    python -m loadtests.bench_metering [--events 300000] [--rate 5000] [--seconds 20]
        [--batch-max 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
import uvloop

from analytics.store import open_store
from deploy.procs import ChildProcess, python_module, start_nats, start_redis
from scheduler.config import ClickHouseConfig, Config, NatsConfig, RedisConfig, dump_config
from scheduler.wire import UsageEvent, encode, usage_subject

CONSUMER = "yard-metering"
STATS_PREFIX = "metering stats "


def _event(i: int, started_at_ms: int) -> UsageEvent:
    return UsageEvent(request_id=f"req-{i:09d}", tenant_id=f"t{i % 20}", key_id=f"k{i % 97}",
                      model=f"m{i % 3}", replica_id=f"r{i % 8}", route="chat",
                      prompt_tokens=100 + i % 900, cached_tokens=i % 64,
                      completion_tokens=i % 500, ttft_ms=20.0 + i % 300,
                      latency_ms=200.0 + i % 3000, priority=i % 3, started_at_ms=started_at_ms)


async def _publish(nc: nats.NATS, events: list[UsageEvent]) -> None:
    """Core publishes (the stream stores them; no ack round trip each), then a flush."""
    for e in events:
        await nc.publish(usage_subject(e.tenant_id), encode(e),
                         headers={"Nats-Msg-Id": e.request_id})
    await nc.flush(timeout=30)


async def _pending(nc: nats.NATS, cfg: Config) -> tuple[int, int, int]:
    js = nc.jetstream()
    try:
        info = await js.consumer_info(cfg.nats.usage_stream, CONSUMER)
    except nats.js.errors.NotFoundError:
        return -1, -1, -1
    return info.num_pending, info.num_ack_pending, info.delivered.stream_seq


def _log_path(work: Path) -> Path:
    return work / "logs" / "metering.log"


async def _start_consumer(work: Path, config_path: Path) -> ChildProcess:
    log_path = _log_path(work)
    proc = ChildProcess("metering", python_module("analytics.metering_main", "--config",
                                                  str(config_path)), log_path)
    offset = log_path.stat().st_size if log_path.exists() else 0

    async def ready() -> bool:
        return "metering ready" in log_path.read_text(errors="replace")[offset:]

    await proc.start()
    await proc.wait_ready(ready, timeout_s=120)
    return proc


async def _stop_consumer(consumer: ChildProcess, work: Path) -> dict[str, int]:
    """Stops it; returns the counters it printed on the way out."""
    await consumer.stop()
    lines = _log_path(work).read_text(errors="replace").splitlines()
    stats = [line.removeprefix(STATS_PREFIX) for line in lines if line.startswith(STATS_PREFIX)]
    return json.loads(stats[-1]) if stats else {}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def _cpu_by_part(consumer_pid: int, nats_pid: int) -> dict[str, float]:
    """CPU seconds so far of the consumer's loop process, its store process
    and nats-server: where each event's cost goes, whatever else the machine
    runs meanwhile."""
    stores = _children(consumer_pid)
    return {"consumer": _cpu_s(consumer_pid), "store": sum(_cpu_s(pid) for pid in stores),
            "nats_server": _cpu_s(nats_pid)}


async def _throughput(nc: nats.NATS, cfg: Config, work: Path, config_path: Path,
                      events: int, nats_pid: int) -> dict[str, object]:
    # A first run creates the stream and the durable consumer, then stops.
    await _stop_consumer(await _start_consumer(work, config_path), work)
    now_ms = int(time.time() * 1000)
    await _publish(nc, [_event(i, now_ms) for i in range(events)])
    consumer = await _start_consumer(work, config_path)
    assert consumer.pid is not None
    try:
        first_s = None
        cpu_before = _cpu_by_part(consumer.pid, nats_pid)
        while True:
            pending, ack_pending, delivered = await _pending(nc, cfg)
            if first_s is None and delivered > 0:
                first_s = time.perf_counter()
            if first_s is not None and pending == 0 and ack_pending == 0:
                break
            await asyncio.sleep(0.01)
        elapsed_s = time.perf_counter() - first_s
        cpu_after = _cpu_by_part(consumer.pid, nats_pid)
    finally:
        stats = await _stop_consumer(consumer, work)
    cpu_us = {part: round((cpu_after[part] - cpu_before[part]) * 1e6 / events, 1)
              for part in cpu_after}
    return {"events": events, "seconds": round(elapsed_s, 3),
            "events_per_s": round(events / elapsed_s), "batches": stats.get("batches", -1),
            "loop_stall_max_ms": stats.get("loop_stall_max_ms", -1),
            "cpu_us_per_event": cpu_us}


async def _lag(nc: nats.NATS, cfg: Config, work: Path, config_path: Path, rate: int,
               seconds: float, first_id: int) -> dict[str, float]:
    consumer = await _start_consumer(work, config_path)
    tick_s = 0.01
    per_tick = max(1, round(rate * tick_s))
    total = int(rate * seconds)
    try:
        began = time.perf_counter()
        sent = 0
        while sent < total:
            # Catch up to the schedule, so the rate holds even when a tick runs late.
            due = min(total, int((time.perf_counter() - began) / tick_s + 1) * per_tick)
            now_ms = int(time.time() * 1000)
            await _publish(nc, [_event(first_id + i, now_ms) for i in range(sent, due)])
            sent = due
            await asyncio.sleep(tick_s)
        published_s = time.perf_counter() - began
        while (await _pending(nc, cfg))[:2] != (0, 0):
            await asyncio.sleep(0.05)
    finally:
        stats = await _stop_consumer(consumer, work)
    return {"rate_per_s": rate, "events": total, "achieved_rate_per_s": round(total / published_s),
            "batches": stats.get("batches", -1),
            "loop_stall_max_ms": stats.get("loop_stall_max_ms", -1)}


def _store_figures(cfg: Config, lag_from_id: int) -> dict[str, float]:
    store = open_store(cfg.metering.clickhouse, cfg.var_dir)
    try:
        db = cfg.metering.clickhouse.database
        [(rows, unique)] = store.client.query(
            f"SELECT count(), uniqExact(request_id) FROM {db}.usage_raw").result_rows
        [(p50, p99, worst)] = store.client.query(
            "SELECT quantile(0.5)(lag), quantile(0.99)(lag), max(lag) FROM (SELECT"
            " toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(started_at) AS lag"
            f" FROM {db}.usage_raw WHERE request_id >= 'req-{lag_from_id:09d}')").result_rows
    finally:
        store.close()
    return {"rows": int(rows), "unique_request_ids": int(unique), "lag_p50_ms": float(p50),
            "lag_p99_ms": float(p99), "lag_max_ms": float(worst)}


async def run(events: int, rate: int, seconds: float, batch_max: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-metering-"))
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    redis_proc, redis_url = await start_redis(work / "redis", work / "logs", persist=False)
    cfg = Config(var_dir=str(work), nats=NatsConfig(url=nats_url),
                 redis=RedisConfig(url=redis_url),
                 metering=msgspec.structs.replace(
                     Config().metering, batch_max=batch_max,
                     clickhouse=ClickHouseConfig(path=str(work / "chdb"))))
    config_path = work / "config.json"
    config_path.write_bytes(dump_config(cfg))
    try:
        nc = await nats.connect(nats_url)
        try:
            assert nats_proc.pid is not None
            throughput = await _throughput(nc, cfg, work, config_path, events, nats_proc.pid)
            lag = await _lag(nc, cfg, work, config_path, rate, seconds, first_id=events)
        finally:
            await nc.close()
        lag.update(await asyncio.to_thread(_store_figures, cfg, events))
    finally:
        await redis_proc.stop()
        await nats_proc.stop()
    return {"throughput": throughput, "steady": lag,
            "config": {"batch_max": cfg.metering.batch_max,
                       "fetch_wait_s": cfg.metering.fetch_wait_s,
                       "linger_s": cfg.metering.linger_s}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_metering")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-max", type=int, default=Config().metering.batch_max)
    args = parser.parse_args(argv)
    result = uvloop.run(run(args.events, args.rate, args.seconds, args.batch_max))
    json.dump(result, sys.stdout, indent=2)
    t, s = result["throughput"], result["steady"]
    print(f"\n\n{'figure':<34}{'value':>14}")
    print(f"{'events/s into chDB (backlog)':<34}{t['events_per_s']:>14,}")
    print(f"{'  worst loop stall (ms)':<34}{t['loop_stall_max_ms']:>14,}")
    for part, cpu_us in t["cpu_us_per_event"].items():
        print(f"{'  CPU us/event, ' + part:<34}{cpu_us:>14,}")
    print(f"{'steady rate (events/s)':<34}{s['achieved_rate_per_s']:>14,}")
    print(f"{'ingest lag p50 (ms)':<34}{s['lag_p50_ms']:>14,.0f}")
    print(f"{'ingest lag p99 (ms)':<34}{s['lag_p99_ms']:>14,.0f}")
    print(f"{'  worst loop stall (ms)':<34}{s['loop_stall_max_ms']:>14,}")
    print(f"{'rows / unique request ids':<34}{s['rows']:>7,}/{s['unique_request_ids']:<,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
