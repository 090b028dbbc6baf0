"""The HTTP/SSE API end to end: the official openai SDK against the ingress,
with real NATS, Redis, Ray actors and chDB, and two simulated replicas."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
import pytest_asyncio

from tests.harness import MODEL, Switchyard, wait_until

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say something about switchyards."}]


@pytest_asyncio.fixture
async def client(switchyard: Switchyard) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=switchyard.base_url, api_key=switchyard.api_key,
                             max_retries=0)
    yield sdk
    await sdk.close()


async def test_chat_non_streaming(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 7


async def test_chat_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


async def test_streaming_without_usage_strips_the_usage_chunk(
        client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_completions_both_ways(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert reply.choices[0].text and reply.usage.completion_tokens == 5
    stream = await client.completions.create(model=MODEL, prompt="Once upon a time",
                                             max_tokens=5, stream=True)
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts)


async def test_models_lists_what_replicas_serve(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({"Authorization": "Bearer sy-nope"}, b'{"model": "m"}', 401, "invalid_api_key"),
    ({}, b'{"model": "m"}', 401, "invalid_api_key"),
    (None, b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404,
     "model_not_found"),
    (None, b'{"model": ', 400, None),
    (None, b'{"model": "m", "messages": "not a list"}', 400, None),
    (None, b'{"model": "m", "messages": [], "max_tokens": 0}', 400, None),
    # A file-like body: aiohttp streams it (a raw 2 MiB bytes body warns).
    (None, io.BytesIO(b"x" * (2 << 20)), 413, "request_too_large"),
])
async def test_errors_in_openai_shape(switchyard: Switchyard, headers: dict[str, str] | None,
                                      body: bytes | io.BytesIO, status: int,
                                      code: str | None) -> None:
    if headers is None:
        headers = {"Authorization": f"Bearer {switchyard.api_key}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(switchyard.base_url + "/chat/completions", data=body,
                                headers=headers) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


async def test_unknown_route_is_404_in_openai_shape(switchyard: Switchyard) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(switchyard.base_url + "/nothing") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"


async def test_client_disconnect_aborts_the_replica_request(switchyard: Switchyard) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 900,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {switchyard.api_key}"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(switchyard.base_url + "/chat/completions", json=body,
                                  headers=headers)
        request_id = resp.headers["x-request-id"]
        replica = switchyard.replica_of(resp.headers["x-switchyard-replica"])
        for _ in range(3):
            await resp.content.readline()
        resp.close()  # the client goes away mid-stream

    async def aborted() -> bool:
        record = replica.ledger.get(request_id)
        return record is not None and record.aborted

    await wait_until(aborted, timeout_s=2.0)
    assert replica.ledger.get(request_id).completion_tokens < 900


async def test_concurrent_requests_spread_over_both_replicas(switchyard: Switchyard) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {switchyard.api_key}"}
    async with aiohttp.ClientSession() as session:
        async def one() -> str:
            async with session.post(switchyard.base_url + "/chat/completions", json=body,
                                    headers=headers) as resp:
                assert resp.status == 200
                return resp.headers["x-switchyard-replica"]

        replicas = await asyncio.gather(*(one() for _ in range(8)))
    # Load is counted at decision time: 8 concurrent requests split 4/4.
    assert sorted(replicas.count(r) for r in set(replicas)) == [4, 4]
