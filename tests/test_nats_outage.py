"""RELIABILITY T30 (`nats_down_spool`, short form) for new requests:
nats-server SIGKILLed under a steady load from a tenant without limits. The
ingress places the requests itself while NATS is away (router/fallback.py),
so new requests keep being answered 200, none 500; their usage waits in the
disk spool, which drains within 60 s of NATS's return, and every served
request id is billed in ClickHouse. A tenant with a budget is refused
meanwhile (503 quota_unavailable), never served unbilled.

And the pricing rule: an unpriced model is refused (403 model_not_priced)
for a tenant without limits too, before any replica, and nothing is billed."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import pytest
import pytest_asyncio
from aiohttp import web

from actors.control_plane import ControlPlane
from actors.control_store import ReplicaRegistry, connect_redis
from deploy.procs import LOOPBACK, free_port, start_nats
from scheduler.control import SYSTEM
from scheduler.tenancy import TenantLimits
from scheduler.wire import REGISTRY_CHANGED_SUBJECT, RegistryChanged, ReplicaInfo, encode
from tests.harness import MODEL, Switchyard, wait_until
from tests.test_usage_ingress import billed
from tests.test_usage_spool import stack_with_nats

pytestmark = pytest.mark.integration

REDIS_DB = 31
RATE_RPS = 200
OUTAGE_S = 8.0
DRAIN_BOUND_S = 60.0


async def _post(session: aiohttp.ClientSession, url: str, key: str,
                model: str = MODEL) -> tuple[int, str, str]:
    """(status, error code, request id) of one small completion."""
    body = {"model": model, "prompt": "Outage", "max_tokens": 3}
    async with session.post(url + "/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        answer = await resp.json()
        return (resp.status, (answer.get("error") or {}).get("code") or "",
                resp.headers.get("x-request-id", ""))


async def _metric(session: aiohttp.ClientSession, yard: Switchyard, name: str) -> float:
    async with session.get(yard.base_url.removesuffix("/v1") + "/metrics") as resp:
        total = 0.0
        for line in (await resp.text()).splitlines():
            if line.startswith(name):
                total += float(line.split()[-1])
        return total


async def _budget_tenant(yard: Switchyard) -> str:
    tenant_id, key = await yard.new_tenant("t30-budget")
    async with connect_redis(yard.cfg.redis) as redis:
        await ControlPlane(redis, yard.cfg.auth, None).update_tenant(
            SYSTEM, "req-t30-budget", tenant_id, limits=TenantLimits(budget_nusd=10**9))
    return key


async def test_new_requests_are_served_while_nats_is_down(tmp_path: Path, redis_url: str,
                                                          ray_cluster: None) -> None:
    async with stack_with_nats(tmp_path, redis_url, REDIS_DB, 100_000) as (yard, procs):
        tenant_id, key = await yard.new_tenant("t30-free")
        budget_key = await _budget_tenant(yard)
        port = int(yard.cfg.nats.url.rsplit(":", 1)[1])
        # (sent at, status, error code, request id), sent at from the start.
        outcomes: list[tuple[float, int, str, str]] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            started_s = time.monotonic()

            async def one() -> None:
                sent_s = time.monotonic() - started_s
                outcomes.append((sent_s, *await _post(session, yard.base_url, key)))

            async def load() -> None:
                tasks: set[asyncio.Task[None]] = set()
                n = 0
                while not stop.is_set():
                    n += 1
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    # Paced by the schedule, not by the answers.
                    await asyncio.sleep(max(0.0, started_s + n / RATE_RPS - time.monotonic()))
                await asyncio.gather(*tasks)

            loading = asyncio.create_task(load())
            await asyncio.sleep(2.0)
            os.kill(procs[0].pid or 0, signal.SIGKILL)
            killed_at_s = time.monotonic() - started_s
            await asyncio.sleep(1.0)
            budget = await _post(session, yard.base_url, budget_key)
            await asyncio.sleep(OUTAGE_S - 1.0)
            await procs[0].stop()
            restarted, _ = await start_nats(tmp_path / "nats", tmp_path / "logs", port=port)
            procs.append(restarted)
            back_at_s = time.monotonic() - started_s
            await asyncio.sleep(3.0)
            stop.set()
            await loading

            async def drained() -> bool:
                return await _metric(session, yard,
                                     "switchyard_usage_spool_depth_events") == 0

            await wait_until(drained, timeout_s=DRAIN_BOUND_S)
            drained_after_s = time.monotonic() - started_s - back_at_s
            fallbacks = await _metric(session, yard, "switchyard_placement_fallbacks_total")

        statuses = collections.Counter(f"{status} {code}".strip()
                                       for _, status, code, _ in outcomes)
        during = collections.Counter(f"{status} {code}".strip() for sent_s, status, code, _
                                     in outcomes if killed_at_s < sent_s < back_at_s)
        print(f"\nT30: {len(outcomes)} requests at {RATE_RPS}/s, all {dict(statuses)}, "
              f"sent during the {OUTAGE_S:.0f} s outage {dict(during)}, "
              f"placed by the ingress {fallbacks:.0f}, spool drained "
              f"{drained_after_s:.1f} s after NATS returned")
        assert during["200"] > 0 and fallbacks > 0
        assert not [s for s in statuses if s.startswith("500")]
        assert budget[:2] == (503, "quota_unavailable")
        served = [rid for _, status, _, rid in outcomes if status == 200]
        stored = await billed(yard, tenant_id, len(served))
        assert set(served) <= set(stored)


@pytest_asyncio.fixture
async def canary(switchyard: Switchyard) -> AsyncIterator[tuple[str, list[str]]]:
    """A replica of a model nobody priced, which records what reaches it."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"error": "canary"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    model = "unpriced-canary"
    redis = connect_redis(switchyard.cfg.redis)
    nc = await nats.connect(switchyard.cfg.nats.url)
    info = ReplicaInfo(id="canary-0", url=f"http://{LOOPBACK}:{port}", models=(model,))
    try:
        await ReplicaRegistry(redis).put_replica(info)
        await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))
        yield model, hits
    finally:
        await ReplicaRegistry(redis).remove_replica(info.id)
        await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))
        await nc.drain()
        await redis.aclose()
        await runner.cleanup()


async def test_an_unpriced_model_is_refused_for_a_tenant_without_limits(
        switchyard: Switchyard, canary: tuple[str, list[str]]) -> None:
    model, hits = canary
    tenant_id, key = await switchyard.new_tenant("unpriced")
    async with aiohttp.ClientSession() as session:
        status, code, refused_id = await _post(session, switchyard.base_url, key, model)
        assert (status, code) == (403, "model_not_priced")
        # A priced request afterwards: the tenant's one billed row is that one.
        status, _, served_id = await _post(session, switchyard.base_url, key)
        assert status == 200
    stored = await billed(switchyard, tenant_id, 1)
    assert set(stored) == {served_id} and refused_id not in stored
    assert hits == []
