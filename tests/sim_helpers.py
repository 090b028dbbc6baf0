"""Shared pieces of the simulator's HTTP tests: a config, request bodies, a
one-replica fleet fixture, and client helpers that check vLLM's framing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from loadtests.simulator import SimFleet, SimReplica, create_app, start_fleet
from scheduler.config import SimulatorConfig

BLOCK = 16
CFG = SimulatorConfig(
    replicas=1,
    model="sim-model",
    prefill_tokens_per_s=1_000_000.0,
    decode_ms_per_token=1.0,
    block_size_tokens=BLOCK,
    cache_blocks=256,
    seed=7,
)
# Long generations that a disconnect cuts short; they fit the 1024-token context.
LONG_MAX_TOKENS = 900
LONG_TEXT = "Routers send each conversation back to the replica that saw it last, " * 4
POLL_DEADLINE_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[1]

Json = dict[str, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BASE_LABELS = frozenset({("model_name", CFG.model), ("engine", "0")})


@pytest_asyncio.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    fleet = await start_fleet(CFG, ports=[0])
    yield fleet
    await fleet.aclose()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@contextlib.asynccontextmanager
async def serve(replica: SimReplica) -> AsyncIterator[str]:
    """One hand-built replica on a free loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(create_app(replica), handler_cancellation=True)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


def chat_body(**extra: Any) -> Json:
    return {"model": CFG.model, "messages": [{"role": "user", "content": LONG_TEXT}], **extra}


def completion_body(**extra: Any) -> Json:
    return {"model": CFG.model, "prompt": LONG_TEXT, **extra}


async def post_json(http: aiohttp.ClientSession, url: str, body: Json, **headers: str) -> Json:
    async with http.post(url, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def post_stream(http: aiohttp.ClientSession, url: str, body: Json) -> list[Json]:
    """The stream's JSON events, checking the SSE framing and the closing [DONE]."""
    async with http.post(url, json=body) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        raw = await response.text()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    return [msgspec.json.decode(event[len("data: ") :]) for event in events[:-2]]


async def ground_truth(http: aiohttp.ClientSession, url: str, request_id: str) -> Json:
    async with http.get(f"{url}/sim/requests/{request_id}") as response:
        assert response.status == 200
        return await response.json()


async def poll_until(check: Callable[[], Awaitable[bool]]) -> None:
    deadline_s = time.monotonic() + POLL_DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline_s, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


