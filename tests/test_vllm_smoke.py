"""Real vLLM replicas behave as switchyard expects: both answer chat and
completions (our X-Request-Id becomes their request id), /tokenize gives the
ids of our own ChatML rendering and tokenization, KV-cache events arrive on
the SUB socket we bind from sequence number 0, and replay returns them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import msgspec
import pytest
from tokenizers import Tokenizer

from deploy.vllm import SERVED_MODEL, TINY_MODEL_DIR
from loadtests.kv_event_sink import KvMessage, replay
from tests.fixtures_vllm import VllmReplicas

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)
EVENTS_TIMEOUT_S = 10.0
BLOCK_SIZE_TOKENS = 32
REPLICAS = [0, 1]
MESSAGES = [
    {"role": "system", "content": "You are a router's test replica."},
    {"role": "user", "content": "Which replica holds my prefix?"},
    {"role": "assistant", "content": "The one with the most overlap."},
    {"role": "user", "content": "Hello again"},
]


def fixed_length(tokens: int) -> dict[str, Any]:
    # Random weights emit EOS at random; these make the length exact.
    return {"ignore_eos": True, "min_tokens": tokens, "max_tokens": tokens}


async def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> tuple[dict[str, Any], Mapping[str, str]]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json(), resp.headers.copy()


async def sse_events(url: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads of a stream, in order."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/event-stream"
            lines = [line.decode().rstrip("\r\n") async for line in resp.content]
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@pytest.mark.parametrize("index", REPLICAS)
async def test_chat_takes_our_request_id(vllm_replicas: VllmReplicas, index: int) -> None:
    request_id = f"smoke-chat-{index}"
    body, headers = await post_json(
        vllm_replicas.urls[index] + "/v1/chat/completions",
        {"model": SERVED_MODEL, "messages": MESSAGES, **fixed_length(8)},
        headers={"X-Request-Id": request_id})
    assert body["id"] == f"chatcmpl-{request_id}"
    assert headers["X-Request-Id"] == request_id
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert "cached_tokens" in body["usage"]["prompt_tokens_details"]


@pytest.mark.parametrize("index", REPLICAS)
async def test_completion_streams_with_usage(vllm_replicas: VllmReplicas, index: int) -> None:
    events = await sse_events(vllm_replicas.urls[index] + "/v1/completions", {
        "model": SERVED_MODEL, "prompt": "Once upon a time", "stream": True,
        "stream_options": {"include_usage": True}, **fixed_length(12)})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert len({chunk["id"] for chunk in chunks}) == 1


async def test_tokenize_matches_our_chatml_tokenization(vllm_replicas: VllmReplicas) -> None:
    body, _ = await post_json(vllm_replicas.urls[0] + "/tokenize", {
        "model": SERVED_MODEL, "messages": MESSAGES, "add_generation_prompt": True})
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MESSAGES)
    chatml += "<|im_start|>assistant\n"
    tokenizer = Tokenizer.from_file(str(TINY_MODEL_DIR / "tokenizer.json"))
    ours = tokenizer.encode(chatml, add_special_tokens=False).ids
    assert body["tokens"] == ours
    assert body["count"] == len(ours)


def stores_block(token_ids: list[int]) -> Callable[[list[KvMessage]], bool]:
    """Whether some batch stores a first block with these tokens."""
    def done(messages: list[KvMessage]) -> bool:
        for message in messages:
            for event in msgspec.msgpack.decode(message.payload)[1]:
                if (event["type"] == "BlockStored" and event["parent_block_hash"] is None
                        and event["token_ids"][:BLOCK_SIZE_TOKENS] == token_ids):
                    return True
        return False
    return done


async def store_blocks(vllm_replicas: VllmReplicas, index: int, prompt: str) -> list[KvMessage]:
    """Runs `prompt` (at least one full block) and returns the replica's
    messages once the one storing its first block has arrived."""
    spec = vllm_replicas.specs[index]
    body, _ = await post_json(spec.url + "/tokenize", {"model": SERVED_MODEL, "prompt": prompt})
    assert body["count"] >= 2 * BLOCK_SIZE_TOKENS
    await post_json(spec.url + "/v1/completions",
                    {"model": SERVED_MODEL, "prompt": prompt, **fixed_length(4)})
    assert spec.kv_events is not None
    return await vllm_replicas.kv_events.wait_for(
        spec.kv_events.topic, stores_block(body["tokens"][:BLOCK_SIZE_TOKENS]), EVENTS_TIMEOUT_S)


def long_prompt(tag: str) -> str:
    return f"{tag}: " + " ".join(f"block {n} of the prefix index test." for n in range(16))


@pytest.mark.parametrize("index", REPLICAS)
async def test_kv_events_arrive_in_sequence(vllm_replicas: VllmReplicas, index: int) -> None:
    messages = await store_blocks(vllm_replicas, index, long_prompt(f"events {index}"))
    assert [m.seq for m in messages] == list(range(len(messages)))
    for message in messages:
        ts, events, data_parallel_rank = msgspec.msgpack.decode(message.payload)
        assert isinstance(ts, float)
        assert data_parallel_rank == 0
        assert {event["type"] for event in events} <= {
            "BlockStored", "BlockRemoved", "AllBlocksCleared"}
    assert vllm_replicas.kv_events.dropped_messages == 0


@pytest.mark.parametrize("index", REPLICAS)
async def test_replay_returns_buffered_batches(vllm_replicas: VllmReplicas, index: int) -> None:
    received = await store_blocks(vllm_replicas, index, long_prompt(f"replay {index}"))
    spec = vllm_replicas.specs[index]
    assert spec.kv_events is not None
    replayed = await replay(spec.kv_events.replay_endpoint, start_seq=1,
                            timeout_s=EVENTS_TIMEOUT_S)
    assert replayed[0].seq == 1
    # Batches published after `received` was taken may follow.
    assert replayed[:len(received) - 1] == received[1:]
