"""The NATS subject API for internal services, and metering end to end:
usage rows in ClickHouse carry exactly the counts the replica reported."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

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
