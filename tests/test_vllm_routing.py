"""switchyard in front of two real vLLM replicas: chat completions streamed
and not, through the official SDK, spread over both, and metered with the
counts vLLM reported. A stack of its own (NATS, Redis db 1, actors, chDB),
so its registry holds only the real replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from deploy.procs import start_nats
from scheduler.wire import USAGE_QUERY_SUBJECT, UsageQuery, encode, usage_reply_decoder
from tests.fixtures_vllm import VllmReplicas
from tests.harness import MODEL, Switchyard, make_config, nats_client, start_switchyard, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

FIXED = {"ignore_eos": True}  # random weights end at random: fix the lengths


@pytest_asyncio.fixture(scope="module")
async def vllm_yard(session_dir: Path, redis_url: str, ray_cluster: None,
                    vllm_replicas: VllmReplicas) -> AsyncIterator[Switchyard]:
    work = session_dir / "vllm-yard"
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    cfg = make_config(work, nats_url, redis_url.removesuffix("/0") + "/1")
    yard = await start_switchyard(cfg, replica_urls=vllm_replicas.urls)
    yield yard
    await yard.aclose()
    await nats_proc.stop()


@pytest_asyncio.fixture
async def client(vllm_yard: Switchyard) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=vllm_yard.base_url, api_key=vllm_yard.api_key,
                             max_retries=0, timeout=60)
    yield sdk
    await sdk.close()


MESSAGES = [{"role": "user", "content": "Route me to a replica that knows this prefix."}]


async def test_chat_through_real_vllm(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, extra_body={**FIXED, "min_tokens": 8})
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 10


async def test_streamed_chat_through_real_vllm(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={**FIXED, "min_tokens": 6})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


async def test_requests_spread_over_both_and_are_metered(vllm_yard: Switchyard) -> None:
    tenant_id, key = await vllm_yard.new_tenant("vllm-metering")
    tenant = openai.AsyncOpenAI(base_url=vllm_yard.base_url, api_key=key, max_retries=0,
                                timeout=60)
    try:
        raws = await asyncio.gather(*(
            tenant.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=32,
                extra_body={**FIXED, "min_tokens": 32}) for _ in range(6)))
    finally:
        await tenant.close()
    replicas = {raw.headers["x-switchyard-replica"] for raw in raws}
    assert replicas == {"ext-0", "ext-1"}
    replies = [raw.parse() for raw in raws]
    expected = (6, sum(r.usage.prompt_tokens for r in replies),
                sum(r.usage.completion_tokens for r in replies))
    async with nats_client(vllm_yard.cfg.nats.url) as nc:
        async def landed() -> bool:
            msg = await nc.request(USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)),
                                   timeout=10)
            totals = usage_reply_decoder.decode(msg.data).totals
            return bool(totals) and (totals[0].requests, totals[0].prompt_tokens,
                                     totals[0].completion_tokens) == expected

        await wait_until(landed, timeout_s=15)
