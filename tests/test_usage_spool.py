"""RELIABILITY T30 (short form): nats-server SIGKILLed under load. Streams
in flight keep being served and end while NATS is away; their usage events
go to the ingress's disk spool, which fills past its bound (requests then
fail closed: 503 usage_spool_full) and drains once NATS is back, and every
served request id ends up in ClickHouse exactly once.

New requests placed by the ingress itself while NATS is away (and a budget
tenant refused meanwhile): tests/test_nats_outage.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from deploy.procs import ChildProcess, start_nats
from tests.harness import MODEL, Switchyard, make_config, start_switchyard, wait_until
from tests.test_usage_ingress import billed

pytestmark = pytest.mark.integration

REDIS_DB = 19
SPOOL_MAX_EVENTS = 5
OUTAGE_S = 5.0


@contextlib.asynccontextmanager
async def stack_with_nats(work: Path, redis_url: str, redis_db: int = REDIS_DB,
                          spool_max_events: int = SPOOL_MAX_EVENTS) -> AsyncIterator[
        tuple[Switchyard, list[ChildProcess]]]:
    """A private stack whose nats-server the test may kill and restart
    (the list holds the running one, on the same port and store)."""
    proc, nats_url = await start_nats(work / "nats", work / "logs")
    procs = [proc]
    try:
        cfg = make_config(work, nats_url, redis_url.removesuffix("/0") + f"/{redis_db}")
        cfg = msgspec.structs.replace(cfg, ingress=msgspec.structs.replace(
            cfg.ingress, spool_max_events=spool_max_events))
        from actors.control_store import connect_redis

        async with connect_redis(cfg.redis) as redis:
            await redis.flushdb()
        yard = await start_switchyard(cfg)
        try:
            yield yard, procs
        finally:
            await yard.aclose()
    finally:
        await procs[-1].stop()


async def _stream(session: aiohttp.ClientSession, yard: Switchyard, key: str,
                  max_tokens: int) -> str | None:
    """One whole stream; its request id when served (200 and [DONE])."""
    body = {"model": MODEL, "prompt": "Spool me", "stream": True, "max_tokens": max_tokens,
            "ignore_eos": True}
    async with session.post(yard.base_url + "/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        text = await resp.text()
        if resp.status != 200:
            return None
        assert text.endswith("data: [DONE]\n\n")
        return resp.headers["x-request-id"]


async def _status(session: aiohttp.ClientSession, yard: Switchyard, key: str) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": "ping", "max_tokens": 2}
    async with session.post(yard.base_url + "/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        answer = await resp.json()
        return resp.status, (answer.get("error") or {}).get("code") or ""


async def _depth(session: aiohttp.ClientSession, yard: Switchyard) -> int:
    """The ingress's spool depth, from its /metrics."""
    async with session.get(yard.base_url.removesuffix("/v1") + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("switchyard_usage_spool_depth_events "):
                return int(float(line.split()[1]))
    raise AssertionError("no spool depth metric")


async def test_nats_killed_under_load_loses_no_usage(tmp_path: Path, redis_url: str,
                                                     ray_cluster: None) -> None:
    async with stack_with_nats(tmp_path, redis_url) as (yard, procs):
        tenant_id, key = await yard.new_tenant("t30")
        port = int(yard.cfg.nats.url.rsplit(":", 1)[1])
        served: list[str] = []
        async with aiohttp.ClientSession() as session:
            async def load() -> None:
                # 20 stream starts a second for 1.5 s, each about 3 s long: all
                # in flight at the kill. (More would saturate this process's
                # loop, which also runs the simulated replicas.)
                tasks = []
                for i in range(30):
                    tasks.append(asyncio.create_task(_stream(session, yard, key, 300 + i)))
                    await asyncio.sleep(0.05)
                served.extend(r for r in await asyncio.gather(*tasks) if r)

            loading = asyncio.create_task(load())
            await asyncio.sleep(2.0)
            os.kill(procs[0].pid or 0, signal.SIGKILL)
            killed_at_s = time.monotonic()
            await loading
            # The streams in flight at the kill ended while NATS was away.
            assert await _depth(session, yard) > SPOOL_MAX_EVENTS
            assert await _status(session, yard, key) == (503, "usage_spool_full")
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed_at_s)))
            await procs[0].stop()
            restarted, _ = await start_nats(tmp_path / "nats", tmp_path / "logs", port=port)
            procs.append(restarted)

            async def drained() -> bool:
                return await _depth(session, yard) == 0

            await wait_until(drained, timeout_s=30.0)

            async def serving() -> bool:
                # Placements work again once the scheduler actor reconnected.
                return (await _status(session, yard, key))[0] == 200

            await wait_until(serving, timeout_s=30.0)
        stored = await billed(yard, tenant_id, len(served) + 1)
        assert set(served) <= set(stored)
