"""Several scheduler actors (real Ray actors in one queue group) behind one
ingress: their in-flight views agree because each counts its peers'
placements, and an actor that hangs and is then killed under load fails no
request."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from scheduler.config import Config, SchedulerConfig
from tests.harness import MODEL, Switchyard, private_switchyard, wait_until

pytestmark = pytest.mark.integration
ACTORS = 3


@pytest_asyncio.fixture(scope="module")
async def yard(session_dir: Path, redis_url: str,
               ray_cluster: None) -> AsyncIterator[Switchyard]:
    """A stack of its own (NATS, Redis database, ingress, Ray actors) with three
    scheduler actors, so killing one leaves the session's stack alone."""
    def with_peers(cfg: Config) -> Config:
        # Slow tokens: a burst's streams stay open while the views are compared.
        return msgspec.structs.replace(
            cfg, scheduler=SchedulerConfig(actors=ACTORS),
            simulator=msgspec.structs.replace(cfg.simulator, decode_ms_per_token=20.0))

    async with private_switchyard(session_dir / "peers-stack", redis_url, 4,
                                  with_peers) as stack:
        yield stack


def _chat(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello peers"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


async def _views(yard: Switchyard) -> dict[str, dict[str, int]]:
    """Each scheduler actor's requests in flight, per replica."""
    names = list(yard.schedulers)
    stats = await asyncio.gather(*(a.stats.remote() for a in yard.schedulers.values()))
    return {name: {k.removeprefix("in_flight@"): v for k, v in s.items()
                   if k.startswith("in_flight@")} for name, s in zip(names, stats, strict=True)}


async def test_actors_views_agree_during_a_burst(yard: Switchyard) -> None:
    headers = {"Authorization": f"Bearer {yard.api_key}"}
    url = yard.base_url + "/chat/completions"
    streams: list[aiohttp.ClientResponse] = []
    async with aiohttp.ClientSession(headers=headers) as session:
        try:
            # One after another, each held open: every placement can see all
            # earlier ones only if the actors tell each other.
            for _ in range(12):
                resp = await session.post(url, json=_chat(200, stream=True))
                assert resp.status == 200
                streams.append(resp)
            went = collections.Counter(r.headers["x-switchyard-replica"] for r in streams)
            assert max(went.values()) - min(went.values()) <= 1, went

            async def agreed() -> bool:
                return all(view == dict(went) for view in (await _views(yard)).values())

            await wait_until(agreed, timeout_s=5)
            for resp in streams:
                await resp.read()
        finally:
            for resp in streams:
                resp.close()

    async def released() -> bool:
        return all(set(v.values()) == {0} for v in (await _views(yard)).values())

    await wait_until(released, timeout_s=10)


async def _load(session: aiohttp.ClientSession, url: str, until_s: float,
                statuses: collections.Counter[int]) -> None:
    while time.monotonic() < until_s:
        async with session.post(url, json=_chat(2)) as resp:
            await resp.read()
            statuses[resp.status] += 1


async def _placement_retries(yard: Switchyard, session: aiohttp.ClientSession) -> float:
    async with session.get(yard.base_url.removesuffix("/v1") + "/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^switchyard_placement_retries_total (\S+)$", text, re.MULTILINE)
    assert found is not None
    return float(found.group(1))


async def test_a_hung_then_killed_actor_under_load_fails_no_request(yard: Switchyard) -> None:
    import ray

    statuses: collections.Counter[int] = collections.Counter()
    url = yard.base_url + "/chat/completions"
    name, victim = next(iter(yard.schedulers.items()))
    pid = await victim.__ray_call__.remote(lambda self: os.getpid())
    async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {yard.api_key}"}) as session:
        retries_before = await _placement_retries(yard, session)
        clients = [asyncio.create_task(_load(session, url, time.monotonic() + 3.0, statuses))
                   for _ in range(8)]
        try:
            await asyncio.sleep(0.7)
            # Hung: still subscribed, so the queue group keeps handing it
            # placements, which the ingress must take elsewhere.
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(1.0)
            served_before_kill = sum(statuses.values())
            ray.kill(victim, no_restart=True)
            os.kill(pid, signal.SIGKILL)
            del yard.schedulers[name]
            yard.actors.remove(victim)
            await asyncio.gather(*clients)
        finally:
            for client in clients:
                client.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*clients, return_exceptions=True)
        assert await _placement_retries(yard, session) > retries_before
    assert served_before_kill > 0 and sum(statuses.values()) > served_before_kill
    assert set(statuses) == {200}, statuses
    survivors: list[Any] = list(yard.schedulers.values())
    assert len(survivors) == ACTORS - 1

    async def released() -> bool:
        stats = await asyncio.gather(*(a.stats.remote() for a in survivors))
        return all(s["in_flight"] == 0 for s in stats)

    await wait_until(released, timeout_s=10)
    stats = await asyncio.gather(*(a.stats.remote() for a in survivors))
    # Each survivor counted placements its peers made, the dead one's included.
    assert all(s["peer_placed"] > 0 for s in stats), stats
