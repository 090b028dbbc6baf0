"""Usage and billing figures over real nats-server, redis-server and the
MeteringService on chDB, in this process: a month of usage (N events, 20
tenants, 3 models) published to JetStream and ingested, then the latency of
the usage queries and a statement (asked over NATS, as the admin API asks),
and the webhook's delivery rate to a loopback receiver (all N events,
signed, acked after each 204). Prints JSON and a short table.

    python -m loadtests.bench_billing [--events 20000] [--calls 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import uvloop
from aiohttp import web

from actors.control_plane import PRICES_KEY
from actors.control_store import connect_redis
from analytics.metering import MeteringService
from analytics.metering_client import MeteringClient
from analytics.webhooks import WebhookService
from deploy.procs import LOOPBACK, free_port, start_nats, start_redis
from scheduler.config import (
    ClickHouseConfig,
    Config,
    MeteringConfig,
    NatsConfig,
    RedisConfig,
    WebhooksConfig,
)
from scheduler.tenancy import Price
from scheduler.wire import UsageEvent, encode, usage_subject
from scheduler.wire.usage import StatementQuery, UsageRowsQuery

OCT_2026_S = 1_790_812_800
NOV_2026_S = 1_793_491_200
MODELS = ("tiny", "small", "big")
PRICE = Price(effective_from_s=0, input_nusd_per_token=150, cached_input_nusd_per_token=75,
              output_nusd_per_token=600)


def _events(n: int, rng: random.Random) -> list[UsageEvent]:
    return [UsageEvent(
        request_id=f"bench-{i}", tenant_id=f"t{i % 20}", key_id=f"k{i % 60}",
        model=MODELS[i % 3], replica_id="r0", route="chat", prompt_tokens=rng.randrange(1, 4000),
        cached_tokens=0, completion_tokens=rng.randrange(0, 800), ttft_ms=rng.uniform(5, 400),
        latency_ms=rng.uniform(100, 5000), status=200,
        started_at_ms=rng.randrange(OCT_2026_S, NOV_2026_S) * 1000) for i in range(n)]


async def _publish(nc: nats.NATS, events: list[UsageEvent]) -> None:
    js = nc.jetstream()
    for start in range(0, len(events), 500):
        await asyncio.gather(*(
            js.publish(usage_subject(e.tenant_id), encode(e), headers={"Nats-Msg-Id": e.request_id})
            for e in events[start:start + 500]))


async def _until(check: Callable[[], bool], timeout_s: float) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError("timed out")
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def _timed(calls: int, call: Callable[[], Awaitable[object]]) -> dict[str, float]:
    samples_s = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples_s.append(time.perf_counter() - started)
    ordered = sorted(samples_s)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2)}


async def _receiver(counted: list[int]) -> tuple[web.AppRunner, str]:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        counted[0] += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    return runner, f"http://{LOOPBACK}:{port}/hook"


async def run(n: int, calls: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-billing-"))
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    redis_proc, redis_url = await start_redis(work / "redis", work / "logs", persist=False)
    delivered = [0]
    runner, hook_url = await _receiver(delivered)
    cfg = Config(var_dir=str(work), nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url),
                 metering=MeteringConfig(clickhouse=ClickHouseConfig(path=str(work / "chdb"))),
                 webhooks=WebhooksConfig(url=hook_url, secret="bench", batch_max=200,
                                         budget_check_interval_s=3600.0))
    redis = connect_redis(cfg.redis)
    for model in MODELS:
        await redis.hset(PRICES_KEY, model, msgspec.json.encode((PRICE,)))
    metering = MeteringService(cfg)
    nc = await nats.connect(nats_url)
    webhooks = WebhookService(cfg)
    try:
        await metering.start()
        await _publish(nc, _events(n, random.Random(1)))
        await _until(lambda: metering.stats()["inserted_rows"] >= n, 600)
        client = MeteringClient(nc)
        month = {"from_ms": OCT_2026_S * 1000, "to_ms": NOV_2026_S * 1000}
        queries = {
            "usage_all_tenants_by_model_day": lambda: client.usage_rows(
                UsageRowsQuery(group_by=("model", "day"), **month)),
            "usage_one_tenant_by_key_hour": lambda: client.usage_rows(
                UsageRowsQuery(tenant_id="t1", group_by=("key", "hour"), **month)),
            "statement_one_tenant": lambda: client.statement_usage(
                StatementQuery(tenant_id="t1", **month)),
        }
        latencies = {name: await _timed(calls, call) for name, call in queries.items()}
        await webhooks.start()
        delivery_s = await _until(lambda: delivered[0] >= n, 600)
        return {"events": n, "query_calls": calls, "queries": latencies,
                "webhook": {"delivered": delivered[0], "seconds": round(delivery_s, 2),
                            "events_per_s": round(n / delivery_s)}}
    finally:
        await webhooks.aclose()
        await nc.close()
        await metering.aclose()
        await redis.aclose()
        await runner.cleanup()
        await redis_proc.stop()
        await nats_proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    result = uvloop.run(run(args.events, args.calls))
    print(json.dumps(result))
    for name, q in result["queries"].items():  # type: ignore[union-attr]
        print(f"{name:34} p50 {q['p50_ms']:8.2f} ms  p99 {q['p99_ms']:8.2f} ms", file=sys.stderr)
    hook = result["webhook"]
    print(f"webhook delivery: {hook['events_per_s']} events/s "  # type: ignore[index]
          f"({hook['delivered']} in {hook['seconds']} s)", file=sys.stderr)  # type: ignore[index]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
