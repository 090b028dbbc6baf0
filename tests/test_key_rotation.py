"""T8 short form, on two ingress processes of a private stack (Redis db 15):
a key rotated with a 5 s grace under steady requests keeps working until
the grace ends (±1 s) and is then refused every time, while the new key
works at once; a revocation reaches both processes within 1 s by broadcast,
and within the key cache TTL when the broadcast is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
import pytest_asyncio

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import connect_redis
from actors.control_tx import nats_publisher
from scheduler.config import Config
from scheduler.control import SYSTEM
from tests.harness import MODEL, Switchyard, more_ingresses, private_switchyard, wait_until

pytestmark = pytest.mark.integration
REDIS_DB = 15
KEY_CACHE_TTL_S = 2.0
GRACE_S = 5
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "rotate"}], "max_tokens": 1}


def _short_ttl(cfg: Config) -> Config:
    return msgspec.structs.replace(cfg, ingress=msgspec.structs.replace(
        cfg.ingress, key_cache_ttl_s=KEY_CACHE_TTL_S))


@pytest_asyncio.fixture(scope="module")
async def ingresses(session_dir: Path, redis_url: str,
                    ray_cluster: None) -> AsyncIterator[tuple[Switchyard, list[str]]]:
    """The stack, and the base URLs of two more ingress processes of it."""
    work = session_dir / "rotation-stack"
    async with private_switchyard(work, redis_url, REDIS_DB, _short_ttl) as yard:
        async with more_ingresses(yard, work, 2) as urls:
            yield yard, urls


@pytest_asyncio.fixture
async def plane(ingresses: tuple[Switchyard, list[str]]) -> AsyncIterator[ControlPlane]:
    yard, _ = ingresses
    redis = connect_redis(yard.cfg.redis)
    nc = await nats.connect(yard.cfg.nats.url)
    yield ControlPlane(redis, yard.cfg.auth, nats_publisher(nc))
    await nc.drain()
    await redis.aclose()


async def _status(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.post(url + "/chat/completions", json=BODY,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def _steady(http: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event,
                  seen: list[tuple[float, int]]) -> None:
    while not stop.is_set():
        sent_at_s = time.time()
        seen.append((sent_at_s, await _status(http, url, key)))
        await asyncio.sleep(0.02)


async def test_a_rotated_key_works_until_its_grace_ends_on_every_ingress(
        ingresses: tuple[Switchyard, list[str]], plane: ControlPlane) -> None:
    _, urls = ingresses
    _, old = await tenant_with_key(plane, "rotation")
    stop = asyncio.Event()
    seen: list[list[tuple[float, int]]] = [[], []]
    async with aiohttp.ClientSession() as http:
        load = [asyncio.create_task(_steady(http, url, old.plaintext, stop, seen[i]))
                for i, url in enumerate(urls)]
        try:
            await asyncio.sleep(0.5)
            new = await plane.rotate_key(SYSTEM, "req-rotate", old.record.key_id,
                                         grace_s=GRACE_S)
            for url in urls:
                assert await _status(http, url, new.plaintext) == 200
            grace_end_s = (await plane.key(old.record.key_id)).expires_at_s
            while time.time() < grace_end_s + 1.5:
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*load)
    for requests in seen:
        assert len(requests) > 50
        assert all(status == 200 for at_s, status in requests if at_s < grace_end_s - 1)
        assert all(status == 401 for at_s, status in requests if at_s > grace_end_s + 1)
        first_refused = next(i for i, (_, status) in enumerate(requests) if status == 401)
        assert all(status == 401 for _, status in requests[first_refused:])


async def _time_to_refusal(http: aiohttp.ClientSession, urls: list[str],
                           key: str) -> list[float]:
    started_s = time.monotonic()
    took = []
    for url in urls:
        async def refused(u: str = url) -> bool:
            return await _status(http, u, key) == 401

        await wait_until(refused, timeout_s=KEY_CACHE_TTL_S + 2)
        took.append(time.monotonic() - started_s)
    return took


async def test_a_revocation_reaches_every_ingress_within_a_second(
        ingresses: tuple[Switchyard, list[str]], plane: ControlPlane) -> None:
    yard, urls = ingresses
    tenant, key = await tenant_with_key(plane, "revocation")
    silent = ControlPlane(plane.redis, yard.cfg.auth, publish=None)
    async with aiohttp.ClientSession() as http:
        for url in urls:  # cached on both
            assert await _status(http, url, key.plaintext) == 200
        await plane.revoke_key(SYSTEM, "req-revoke", key.record.key_id)
        assert max(await _time_to_refusal(http, urls, key.plaintext)) < 1.0

        # The broadcast lost: the cache TTL bounds it.
        lost = await plane.create_key(SYSTEM, "req-k", tenant.tenant_id)
        for url in urls:
            assert await _status(http, url, lost.plaintext) == 200
        await silent.revoke_key(SYSTEM, "req-revoke-silent", lost.record.key_id)
        took = await _time_to_refusal(http, urls, lost.plaintext)
        assert max(took) <= KEY_CACHE_TTL_S + 0.5
