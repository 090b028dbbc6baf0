"""The NATS subject API for internal services, and metering end to end:
usage rows in ClickHouse carry exactly the counts the replica reported."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from actors.control_plane import ControlPlane
from actors.control_store import connect_redis
from scheduler.control import SYSTEM
from scheduler.tenancy import TenantLimits
from scheduler.wire import (
    USAGE_QUERY_SUBJECT,
    ApiChunk,
    ApiEnd,
    ApiError,
    ApiResponse,
    UsageQuery,
    api_reply_decoder,
    encode,
    usage_reply_decoder,
)
from tests.harness import MODEL, Switchyard, wait_until

pytestmark = pytest.mark.integration

CHAT = "yard.v1.chat.completions"


@pytest_asyncio.fixture
async def nc(switchyard: Switchyard) -> AsyncIterator[NATS]:
    client = await nats.connect(switchyard.cfg.nats.url)
    yield client
    await client.drain()


def _auth(yard: Switchyard) -> dict[str, str]:
    return {"Authorization": f"Bearer {yard.api_key}"}


def _body(**extra: object) -> bytes:
    return msgspec.json.encode({"model": MODEL, "messages": [
        {"role": "user", "content": "Tell me about NATS."}], **extra})


async def _stream(nc: NATS, headers: dict[str, str], body: bytes) -> list[object]:
    """Sends a streaming request and collects replies up to the end or an error."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(CHAT, body, reply=inbox, headers=headers)
    replies: list[object] = []
    while True:
        reply = api_reply_decoder.decode((await sub.next_msg(timeout=5)).data)
        replies.append(reply)
        if isinstance(reply, (ApiEnd, ApiError)):
            break
    await sub.unsubscribe()
    return replies


async def test_non_streaming_request_gets_one_response(
        switchyard: Switchyard, nc: NATS) -> None:
    msg = await nc.request(CHAT, _body(max_tokens=5), timeout=5, headers=_auth(switchyard))
    reply = api_reply_decoder.decode(msg.data)
    assert isinstance(reply, ApiResponse)
    completion = msgspec.json.decode(reply.data)
    assert completion["object"] == "chat.completion"
    assert completion["usage"]["completion_tokens"] == 5


async def test_streaming_request_gets_chunks_then_end(switchyard: Switchyard, nc: NATS) -> None:
    replies = await _stream(nc, _auth(switchyard), _body(max_tokens=4, stream=True))
    assert isinstance(replies[-1], ApiEnd)
    chunks = [msgspec.json.decode(r.data) for r in replies[:-1] if isinstance(r, ApiChunk)]
    assert len(chunks) == len(replies) - 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in chunks)


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({}, _body(), 401),
    ({"Authorization": "Bearer sy-wrong"}, _body(), 401),
    (None, b"{not json", 400),
    (None, msgspec.json.encode({"model": "nope", "messages": [{"role": "user"}]}), 404),
])
async def test_errors_have_the_same_shape(switchyard: Switchyard, nc: NATS,
                                          headers: dict[str, str] | None, body: bytes,
                                          status: int) -> None:
    msg = await nc.request(CHAT, body, timeout=5,
                           headers=_auth(switchyard) if headers is None else headers)
    reply = api_reply_decoder.decode(msg.data)
    assert isinstance(reply, ApiError) and reply.status == status
    assert set(reply.error) == {"message", "type", "param", "code"}


async def _totals(nc: NATS, tenant_id: str) -> tuple[int, int, int]:
    msg = await nc.request(USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)),
                           timeout=10)
    reply = usage_reply_decoder.decode(msg.data)
    assert not reply.error, reply.error
    total = next((t for t in reply.totals if t.tenant_id == tenant_id), None)
    if total is None:
        return 0, 0, 0
    return total.requests, total.prompt_tokens, total.completion_tokens


async def test_usage_lands_in_clickhouse_with_the_replica_counts(
        switchyard: Switchyard, nc: NATS) -> None:
    tenant_id, key = await switchyard.new_tenant("metering-check")
    auth = {"Authorization": f"Bearer {key}"}
    expected_prompt = expected_completion = 0
    for max_tokens in (3, 8):
        msg = await nc.request(CHAT, _body(max_tokens=max_tokens, ignore_eos=True), timeout=5,
                               headers=auth)
        usage = msgspec.json.decode(api_reply_decoder.decode(msg.data).data)["usage"]
        expected_prompt += usage["prompt_tokens"]
        expected_completion += usage["completion_tokens"]
    replies = await _stream(nc, auth, _body(max_tokens=6, stream=True, ignore_eos=True))
    assert isinstance(replies[-1], ApiEnd)
    # The streamed request's truth is the replica's own ledger; the chunk id
    # carries the request id, as vLLM's does.
    request_id = msgspec.json.decode(replies[0].data)["id"].removeprefix("chatcmpl-")
    truth = next(r.ledger.get(request_id) for r in switchyard.fleet.replicas
                 if r.ledger.get(request_id) is not None)
    assert truth.completion_tokens == 6
    expected = (3, expected_prompt + truth.prompt_tokens, expected_completion + 6)

    async def landed() -> bool:
        return await _totals(nc, tenant_id) == expected

    await wait_until(landed, timeout_s=15)


async def test_a_rate_limit_error_carries_retry_after_and_the_ratelimit_numbers(
        switchyard: Switchyard, nc: NATS) -> None:
    async with connect_redis(switchyard.cfg.redis) as redis:
        plane = ControlPlane(redis, switchyard.cfg.auth, None)
        tenant = await plane.create_tenant(SYSTEM, "nats-rl-1", "nats-rl-" + secrets.token_hex(3),
                                           limits=TenantLimits(requests_per_minute=1))
        key = (await plane.create_key(SYSTEM, "nats-rl-2", tenant.tenant_id)).plaintext
    auth = {"Authorization": f"Bearer {key}"}
    first = api_reply_decoder.decode((await nc.request(CHAT, _body(max_tokens=1), timeout=5,
                                                       headers=auth)).data)
    assert isinstance(first, ApiResponse)
    reply = api_reply_decoder.decode((await nc.request(CHAT, _body(max_tokens=1), timeout=5,
                                                       headers=auth)).data)
    assert isinstance(reply, ApiError) and reply.status == 429
    assert reply.retry_after_s is not None and 0 < reply.retry_after_s <= 60
    assert reply.headers["x-ratelimit-limit-requests"] == "1"
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    # The same numbers HTTP sends for the same refusal.
    async with aiohttp.ClientSession() as http, http.post(
            switchyard.base_url + "/chat/completions", headers=auth,
            data=_body(max_tokens=1)) as resp:
        assert resp.status == 429
        same = {name: resp.headers.get(name) for name in reply.headers if "reset" not in name}
        assert same == {name: v for name, v in reply.headers.items() if "reset" not in name}
        assert set(reply.headers) == {n for n in resp.headers if n.startswith("x-ratelimit-")}
        assert int(resp.headers["Retry-After"]) == math.ceil(reply.retry_after_s)
