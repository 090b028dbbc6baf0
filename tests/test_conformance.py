"""Conformance: the same assertions against the simulator and real vLLM.
SSE framing and chunk shapes, usage fields, metric names, /tokenize ids, the
KV-event wire format, and block hashes computed by our own code equal to the
ones the replica publishes. A mismatch in any of them fails."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from tokenizers import Tokenizer

from deploy.vllm import SERVED_MODEL, TINY_MODEL_DIR
from loadtests.kv_event_sink import KvEventSink, KvMessage
from loadtests.simulator.fleet import start_fleet
from scheduler.block_hash import block_hashes, low64
from scheduler.config import SimulatorConfig
from scheduler.kv_events import BlockStored, decode_batch

pytestmark = pytest.mark.integration

BLOCK_SIZE = 32
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
METRICS = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
    "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket", "vllm:cache_config_info")
FIXED = {"ignore_eos": True}


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    topic: str
    sink: KvEventSink


@pytest_asyncio.fixture(scope="module")
async def simulator_backend() -> AsyncIterator[Backend]:
    sink = KvEventSink()
    await sink.start()
    # Configured like the real replicas: block size, KV cache, events on.
    cfg = SimulatorConfig(replicas=1, block_size_tokens=BLOCK_SIZE, cache_blocks=128,
                          decode_ms_per_token=2.0, kv_events_endpoint=sink.endpoint,
                          kv_events_topic="conformance-{index}")
    fleet = await start_fleet(cfg, ports=[0])
    yield Backend("simulator", fleet.urls[0], "conformance-0", sink)
    await fleet.aclose()
    await sink.aclose()


@pytest.fixture(scope="module", params=["simulator", pytest.param("vllm", marks=pytest.mark.vllm)])
def backend(request: pytest.FixtureRequest) -> Backend:
    # Synchronous, so it may pick an async fixture by name.
    if request.param == "simulator":
        return request.getfixturevalue("simulator_backend")
    replicas = request.getfixturevalue("vllm_replicas")
    return Backend("vllm", replicas.urls[0], replicas.specs[0].kv_events.topic,
                   replicas.kv_events)


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def _sse(url: str, body: dict[str, Any]) -> list[str]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return (await resp.text()).split("\n")


def _events(lines: list[str]) -> list[dict[str, Any]]:
    """Checks vLLM's framing (`data: ` lines, a blank line after each, no
    `event:`/`id:` lines, `[DONE]` last) and returns the decoded chunks."""
    payloads = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in payloads)
    assert payloads[-1] == "data: [DONE]"
    assert lines[-2:] == ["", ""] and lines[1] == ""
    return [json.loads(line.removeprefix("data: ")) for line in payloads[:-1]]


async def test_streamed_chat_shapes(backend: Backend) -> None:
    chunks = _events(await _sse(backend.url + "/v1/chat/completions", _chat(
        "Shapes, please.", stream=True, max_tokens=5, min_tokens=5,
        stream_options={"include_usage": True}, **FIXED)))
    assert all(CHUNK_KEYS <= set(c) and c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) == USAGE_KEYS
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_continuous_usage_on_every_chunk(backend: Backend) -> None:
    chunks = _events(await _sse(backend.url + "/v1/completions", {
        "model": SERVED_MODEL, "prompt": "Count with me", "stream": True, "max_tokens": 4,
        "min_tokens": 4, **FIXED,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    assert all(c["object"] == "text_completion" and c.get("usage") for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in chunks if c["choices"]][-1] == 4


async def test_repeated_prompt_reports_cached_tokens(backend: Backend) -> None:
    content = f"{uuid.uuid4()} " + "the same long prefix again and again " * 20
    usages = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(backend.url + "/v1/chat/completions",
                                    json=_chat(content, max_tokens=2, **FIXED)) as resp:
                usages.append((await resp.json())["usage"])
    assert USAGE_KEYS <= set(usages[0])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % BLOCK_SIZE == 0 and cached < usages[1]["prompt_tokens"]


async def test_metric_names_and_cache_config(backend: Backend) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            backend.url + "/metrics") as resp:
        text = await resp.text()
    for name in METRICS:
        assert f"{name}{{" in text, f"{backend.name} lacks {name}"
    info = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info{"))
    assert f'block_size="{BLOCK_SIZE}"' in info and 'enable_prefix_caching="True"' in info
    assert 'prefix_caching_hash_algo="sha256"' in info and 'num_gpu_blocks="128"' in info
    assert f'model_name="{SERVED_MODEL}"' in text


async def _tokenize(backend: Backend, messages: list[dict[str, str]]) -> list[int]:
    body = {"model": SERVED_MODEL, "messages": messages, "add_generation_prompt": True}
    async with aiohttp.ClientSession() as session, session.post(
            backend.url + "/tokenize", json=body) as resp:
        reply = await resp.json()
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 1024
    return reply["tokens"]


async def test_tokenize_ids_are_the_tiny_models(backend: Backend) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Héllo, switchyard! 1234"}]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in messages) + "<|im_start|>assistant\n"
    ours = Tokenizer.from_file(str(TINY_MODEL_DIR / "tokenizer.json")).encode(rendered).ids
    assert await _tokenize(backend, messages) == ours


def _stored(messages: list[KvMessage]) -> list[BlockStored]:
    return [event for message in messages for event in decode_batch(message.payload).events
            if isinstance(event, BlockStored)]


async def test_kv_events_carry_our_block_hashes(backend: Backend) -> None:
    messages = [{"role": "user", "content": f"{uuid.uuid4()} " + "prefix caching " * 40}]
    token_ids = await _tokenize(backend, messages)
    expected = [low64(d) for d in block_hashes(token_ids, BLOCK_SIZE, "sha256")]
    assert len(expected) >= 3
    before = len(backend.sink.messages(backend.topic))
    async with aiohttp.ClientSession() as session, session.post(
            backend.url + "/v1/chat/completions",
            json={"model": SERVED_MODEL, "messages": messages, "max_tokens": 1}) as resp:
        assert resp.status == 200

    def announced(batch: list[KvMessage]) -> bool:
        hashes = {h for e in _stored(batch[before:]) for h in e.block_hashes}
        return set(expected) <= hashes

    batch = await backend.sink.wait_for(backend.topic, announced, timeout_s=10)
    fresh = batch[before:]
    assert [m.seq for m in fresh] == list(range(fresh[0].seq, fresh[0].seq + len(fresh)))
    first = next(e for e in _stored(fresh) if e.block_hashes[0] == expected[0])
    assert first.parent_block_hash is None and first.block_size == BLOCK_SIZE
    assert first.token_ids[:BLOCK_SIZE] == token_ids[:BLOCK_SIZE]
    assert first.medium == "GPU" and first.lora_id is None


async def test_unknown_model_error_shape(backend: Backend) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            backend.url + "/v1/chat/completions", json={**_chat("x"), "model": "nope"}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == 404
