"""Saturation end to end over HTTP: when every replica is saturated a
request waits in the scheduler's fair queue (the ingress holds it on the
interim PlaceQueued) and is served when a replica frees up; past its
`max_queue_s` it is a 503 `queue_timeout` with Retry-After, and sheddable
work (x-priority -1) is refused at once. A stack of its own whose replicas
saturate at two requests each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from scheduler.config import Config, SaturationConfig, SchedulerConfig
from tests.harness import MODEL, Switchyard, private_switchyard

pytestmark = pytest.mark.integration
MAX_QUEUE_S = 1.5
DECODE_MS_PER_TOKEN = 20.0
# Two replicas, saturated at two requests in flight each (one running, one waiting).
CAPACITY = 4


@pytest_asyncio.fixture(scope="module")
async def yard(session_dir: Path, redis_url: str,
               ray_cluster: None) -> AsyncIterator[Switchyard]:
    def saturating(cfg: Config) -> Config:
        return msgspec.structs.replace(
            cfg,
            ingress=msgspec.structs.replace(cfg.ingress, max_queue_s=MAX_QUEUE_S),
            scheduler=SchedulerConfig(saturation=SaturationConfig(max_num_seqs=1,
                                                                  waiting_requests=1)),
            simulator=msgspec.structs.replace(cfg.simulator,
                                              decode_ms_per_token=DECODE_MS_PER_TOKEN))

    async with private_switchyard(session_dir / "saturation-stack", redis_url, 7,
                                  saturating) as stack:
        yield stack


async def _chat(session: aiohttp.ClientSession, yard: Switchyard, max_tokens: int,
                priority: str | None = None) -> tuple[int, dict[str, str], float]:
    """(status, headers, seconds taken) of one non-streaming request."""
    headers = {"Authorization": f"Bearer {yard.api_key}"}
    if priority is not None:
        headers["x-priority"] = priority
    body = {"model": MODEL, "messages": [{"role": "user", "content": "wait your turn"}],
            "max_tokens": max_tokens, "ignore_eos": True}
    started = time.monotonic()
    async with session.post(yard.base_url + "/chat/completions", json=body,
                            headers=headers) as resp:
        await resp.read()
        return resp.status, dict(resp.headers), time.monotonic() - started


async def _queue_counts(yard: Switchyard) -> dict[str, int]:
    stats = await asyncio.gather(*(a.stats.remote() for a in yard.schedulers.values()))
    return {k: sum(s.get(k, 0) for s in stats) for k in ("enqueued", "dequeued", "shed",
                                                        "queue_timeout")}


async def test_a_saturated_fleet_queues_then_serves(yard: Switchyard) -> None:
    before = await _queue_counts(yard)
    # 25 tokens at 20 ms: each request holds its replica for about half a second.
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(_chat(session, yard, 25)
                                         for _ in range(CAPACITY + 2)))
    assert [status for status, _, _ in results] == [200] * (CAPACITY + 2)
    after = await _queue_counts(yard)
    assert after["enqueued"] - before["enqueued"] == 2
    assert after["dequeued"] - before["dequeued"] == 2
    # The queued ones waited for a replica to free up.
    assert sorted(elapsed for _, _, elapsed in results)[-1] > 0.9


async def test_past_its_deadline_a_queued_request_is_a_503_and_sheddable_work_goes_first(
        yard: Switchyard) -> None:
    async with aiohttp.ClientSession() as session:
        # 150 tokens at 20 ms: the fleet stays saturated for 3 s, longer than MAX_QUEUE_S.
        holders = [asyncio.create_task(_chat(session, yard, 150)) for _ in range(CAPACITY)]
        await asyncio.sleep(0.5)
        shed_status, shed_headers, shed_s = await _chat(session, yard, 5, priority="-1")
        late_status, late_headers, late_s = await _chat(session, yard, 5)
        held = await asyncio.gather(*holders)
    assert [status for status, _, _ in held] == [200] * CAPACITY
    assert shed_status == 503 and "Retry-After" in shed_headers and shed_s < 0.5
    assert late_status == 503 and "Retry-After" in late_headers
    assert MAX_QUEUE_S - 0.1 < late_s < MAX_QUEUE_S + 1.0
    counts = await _queue_counts(yard)
    assert counts["shed"] >= 1 and counts["queue_timeout"] >= 1
