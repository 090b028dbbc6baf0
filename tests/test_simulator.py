"""The replica simulator: pure engine units, then replicas served over HTTP on
free loopback ports and driven with aiohttp's client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from loadtests.simulator import SimFleet, SimReplica, create_app, start_fleet
from loadtests.simulator.engine import Generation, SamplingLimits, SimEngine
from loadtests.simulator.prefix_cache import PrefixCache, block_hashes
from loadtests.simulator.tokens import encode, render_chat, split_pieces
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
LONG_TEXT = "Routers send each conversation back to the replica that saw it last, " * 4
POLL_DEADLINE_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[1]

Json = dict[str, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BASE_LABELS = frozenset({("model_name", CFG.model), ("engine", "0")})


# --- pure engine --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  two  spaces\n\nand tabs\t", "", "<|im_start|>user\nhi<|im_end|>\n"],
)
def test_tokenizer_is_lossless_and_deterministic(text: str) -> None:
    assert "".join(split_pieces(text)) == text
    assert encode(text) == encode(text)
    assert all(0 <= token < 2**31 for token in encode(text))


def test_token_ids_are_pinned_across_processes() -> None:
    # Hash-derived ids: a router or load generator in another process may rely on them.
    assert split_pieces("Hello, world!") == ["Hello", ",", " world", "!"]
    assert encode("Hello, world!") == [214367772, 2141469871, 181662943, 11498590]


def test_chat_template_keeps_the_conversation_prefix() -> None:
    history = [("system", "Be brief."), ("user", "What is a router?")]
    longer = [*history, ("assistant", "It routes."), ("user", "And a replica?")]
    short_ids = encode(render_chat(history))
    # Drop the generation prompt (<|im_start|>, "assistant", "\n") from the short one.
    shared = short_ids[:-3]
    assert encode(render_chat(longer))[: len(shared)] == shared


def test_block_hashes_chain_over_full_blocks() -> None:
    ids = list(range(40))
    hashes = block_hashes(ids, BLOCK)
    assert len(hashes) == 2  # the 8-token tail is not a full block
    changed = block_hashes([999, *ids[1:]], BLOCK)
    assert changed[0] != hashes[0] and changed[1] != hashes[1]
    assert block_hashes(ids[:32], BLOCK) == hashes


def test_prefix_cache_evicts_least_recent_chain_tails_first() -> None:
    cache = PrefixCache(capacity_blocks=4)
    chain_a = block_hashes(list(range(48)), BLOCK)
    chain_b = block_hashes(list(range(100, 148)), BLOCK)
    cache.store(chain_a)
    cache.store(chain_b)
    assert len(cache) == 4 and cache.evicted_blocks == 2
    assert cache.match(chain_b) == 3
    assert cache.match(chain_a) == 1  # its head survives, its tail went first


@pytest.mark.parametrize(("prompt_tokens", "cached_tokens"), [(32, 16), (33, 32), (15, 0)])
def test_cached_tokens_never_cover_the_whole_prompt(
    prompt_tokens: int, cached_tokens: int
) -> None:
    engine = SimEngine(CFG)
    prompt = list(range(prompt_tokens))
    limits = SamplingLimits(max_tokens=1)
    engine.prefill_done(engine.admit(prompt, limits, now_s=0.0))
    assert engine.admit(prompt, limits, now_s=1.0).cached_tokens == cached_tokens


def test_token_schedule_charges_only_uncached_prefill() -> None:
    cfg = msgspec.structs.replace(CFG, prefill_tokens_per_s=1_000.0, decode_ms_per_token=10.0)
    engine = SimEngine(cfg)
    prompt = list(range(100))
    cold = engine.admit(prompt, SamplingLimits(max_tokens=4), now_s=5.0)
    assert cold.schedule.due_at_s(0) == pytest.approx(5.0 + 0.100)
    assert cold.schedule.due_at_s(3) == pytest.approx(5.0 + 0.100 + 0.030)
    engine.prefill_done(cold)
    warm = engine.admit(prompt, SamplingLimits(max_tokens=4), now_s=9.0)
    assert warm.cached_tokens == 96
    assert warm.schedule.due_at_s(0) == pytest.approx(9.0 + 0.004)


def run_to_end(prompt: list[int], limits: SamplingLimits) -> Generation:
    generation = SimEngine(CFG).admit(prompt, limits, now_s=0.0)
    while not generation.done:
        generation.step()
    return generation


def test_generation_is_deterministic_and_honours_limits() -> None:
    prompts = [encode(f"prompt {index}: {LONG_TEXT}") for index in range(40)]
    natural = SamplingLimits(max_tokens=400, min_tokens=5)
    runs = [run_to_end(prompt, natural) for prompt in prompts]
    again = [run_to_end(prompt, natural) for prompt in prompts]
    assert [run.output_ids for run in runs] == [run.output_ids for run in again]
    # EOS (probability 0.02 a token) comes well before 400 tokens, never before min_tokens.
    assert {run.finish_reason for run in runs} == {"stop"}
    assert min(run.completion_tokens for run in runs) > natural.min_tokens
    fixed = run_to_end(prompts[0], SamplingLimits(max_tokens=60, ignore_eos=True))
    assert (fixed.completion_tokens, fixed.finish_reason) == (60, "length")
    # ignore_eos changes where the text ends, not what it says.
    assert fixed.output_ids[: runs[0].completion_tokens - 1] == runs[0].output_ids[:-1]


# --- over HTTP ------------------------------------------------------------------


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


async def test_chat_non_stream(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    body = chat_body(max_completion_tokens=8, ignore_eos=True)
    headers = {"X-Request-Id": "c-1"}
    reply = await post_json(http, f"{url}/v1/chat/completions", body, **headers)
    assert reply["id"] == "chatcmpl-c-1" and reply["object"] == "chat.completion"
    assert reply["model"] == CFG.model
    (choice,) = reply["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = reply["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    truth = await ground_truth(http, url, "c-1")
    assert truth["prompt_tokens"] == usage["prompt_tokens"] and truth["completion_tokens"] == 8
    assert truth["finished"] and not truth["aborted"] and truth["finish_reason"] == "length"
    assert truth["ended_at_s"] >= truth["started_at_s"]


async def test_chat_stream_with_final_usage_chunk(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    options = {"include_usage": True}
    body = chat_body(max_tokens=5, ignore_eos=True, stream=True, stream_options=options)
    events = await post_stream(http, f"{fleet.urls[0]}/v1/chat/completions", body)
    first, *tokens, finish, usage_chunk = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(tokens) == 4
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in tokens)
    assert finish["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in [first, *tokens, finish])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert len({chunk["id"] for chunk in events}) == 1


async def test_continuous_usage_on_every_chunk(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = completion_body(max_tokens=4, ignore_eos=True, stream=True, stream_options=options)
    events = await post_stream(http, f"{fleet.urls[0]}/v1/completions", body)
    assert [chunk["usage"]["completion_tokens"] for chunk in events] == [1, 2, 3, 4, 4]
    assert events[0]["object"] == "text_completion" and events[0]["id"].startswith("cmpl-")
    # Only the final usage chunk names cached tokens, as in vLLM.
    assert ["prompt_tokens_details" in chunk["usage"] for chunk in events] == [False] * 4 + [True]


async def test_completion_stream_matches_non_stream(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = f"{fleet.urls[0]}/v1/completions"
    whole = await post_json(http, url, completion_body(max_tokens=6, ignore_eos=True))
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["finish_reason"] == "length"
    body = completion_body(max_tokens=6, ignore_eos=True, stream=True)
    events = await post_stream(http, url, body)
    assert "".join(chunk["choices"][0]["text"] for chunk in events) == whole["choices"][0]["text"]


async def test_repeated_prompt_hits_the_prefix_cache(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = f"{fleet.urls[0]}/v1/chat/completions"
    cold = await post_json(http, url, chat_body(max_tokens=2))
    warm = await post_json(http, url, chat_body(max_tokens=2))
    prompt_tokens = warm["usage"]["prompt_tokens"]
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < cached < prompt_tokens and cached % BLOCK == 0
    assert warm["choices"][0]["message"] == cold["choices"][0]["message"]


async def test_models_health_and_load(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    async with http.get(f"{url}/v1/models") as response:
        models = await response.json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["owned_by"]) == (CFG.model, "model", "vllm")
    assert card["root"] == CFG.model and card["parent"] is None and card["max_model_len"] > 0
    async with http.get(f"{url}/health") as response:
        assert response.status == 200 and await response.read() == b""
    async with http.get(f"{url}/load") as response:
        assert await response.json() == {"server_load": 0}


async def test_metrics_names_and_token_counts(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    body = completion_body(max_tokens=7, ignore_eos=True)
    reply = await post_json(http, f"{url}/v1/completions", body)
    samples = await scrape(http, url)
    prompt_tokens = reply["usage"]["prompt_tokens"]
    assert samples[("vllm:generation_tokens_total", BASE_LABELS)] == 7
    assert samples[("vllm:prompt_tokens_total", BASE_LABELS)] == prompt_tokens
    assert samples[("vllm:prefix_cache_queries_total", BASE_LABELS)] == prompt_tokens
    assert samples[("vllm:prefix_cache_hits_total", BASE_LABELS)] == 0
    length_labels = BASE_LABELS | {("finished_reason", "length")}
    assert samples[("vllm:request_success_total", length_labels)] == 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert samples[(f"vllm:{gauge}", BASE_LABELS)] == 0
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert samples[(f"vllm:{histogram}_seconds_count", BASE_LABELS)] == 1
    # Seven tokens: six gaps between them.
    assert samples[("vllm:inter_token_latency_seconds_count", BASE_LABELS)] == 6
    info = next(labels for name, labels in samples if name == "vllm:cache_config_info")
    assert {("block_size", str(BLOCK)), ("num_gpu_blocks", str(CFG.cache_blocks))} <= info
    assert {("enable_prefix_caching", "True"), ("prefix_caching_hash_algo", "sha256")} <= info
    assert not any(name.endswith("_created") for name, _ in samples)


@pytest.mark.parametrize(
    ("path", "body", "status", "err_type"),
    [
        ("/v1/chat/completions", chat_body(model="nope"), 404, "NotFoundError"),
        ("/v1/completions", completion_body(model="nope"), 404, "NotFoundError"),
        ("/v1/chat/completions", b'{"model": "sim-model", "messages": [', 400, "BadRequestError"),
        ("/v1/completions", b"not json", 400, "BadRequestError"),
        ("/v1/completions", completion_body(prompt=42), 400, "BadRequestError"),
        ("/v1/completions", completion_body(prompt=""), 400, "BadRequestError"),
        ("/v1/completions", completion_body(stream_options={}), 400, "BadRequestError"),
        ("/v1/completions", completion_body(max_tokens=0), 400, "BadRequestError"),
        ("/v1/completions", completion_body(max_tokens=10**6), 400, "BadRequestError"),
        ("/v1/completions", completion_body(min_tokens=20, max_tokens=10), 400, "BadRequestError"),
    ],
)
async def test_errors_in_vllm_shape(
    fleet: SimFleet,
    http: aiohttp.ClientSession,
    path: str,
    body: Json | bytes,
    status: int,
    err_type: str,
) -> None:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{fleet.urls[0]}{path}", data=data, headers=headers) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (err_type, status) and error["message"]


async def test_ground_truth_lists_ids_and_404s_unknown(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    body = completion_body(max_tokens=1)
    await post_json(http, f"{url}/v1/completions", body, **{"X-Request-Id": "gt-1"})
    async with http.get(f"{url}/sim/requests") as response:
        assert (await response.json())["request_ids"] == ["gt-1"]
    async with http.get(f"{url}/sim/requests/never-sent") as response:
        assert response.status == 404


async def test_client_disconnect_aborts_the_request(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    max_tokens = 5_000
    body = chat_body(max_tokens=max_tokens, ignore_eos=True, stream=True)
    headers = {"X-Request-Id": "gone"}
    response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    try:
        for _ in range(2):
            assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
        async with http.get(f"{url}/load") as load:
            assert await load.json() == {"server_load": 1}
    finally:
        response.close()

    async def aborted() -> bool:
        return bool((await ground_truth(http, url, "gone"))["aborted"])

    await poll_until(aborted)
    truth = await ground_truth(http, url, "gone")
    assert truth["finished"] and truth["finish_reason"] == "abort"
    assert 1 <= truth["completion_tokens"] < max_tokens
    samples = await scrape(http, url)
    abort_labels = BASE_LABELS | {("finished_reason", "abort")}
    assert samples[("vllm:request_success_total", abort_labels)] == 1
    assert samples[("vllm:generation_tokens_total", BASE_LABELS)] == truth["completion_tokens"]
    assert samples[("vllm:num_requests_running", BASE_LABELS)] == 0


async def test_cancelled_non_stream_request_is_aborted(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    replica = fleet.replicas[0]
    body = completion_body(max_tokens=5_000, ignore_eos=True)
    headers = {"X-Request-Id": "nb"}
    client = asyncio.create_task(post_json(http, f"{url}/v1/completions", body, **headers))

    async def generating() -> bool:
        record = replica.ledger.get("nb")
        return record is not None and record.completion_tokens > 0

    await poll_until(generating)
    client.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client

    async def aborted() -> bool:
        return bool((await ground_truth(http, url, "nb"))["aborted"])

    await poll_until(aborted)
    assert replica.num_running == 0


async def test_requests_beyond_the_running_limit_wait(http: aiohttp.ClientSession) -> None:
    replica = SimReplica(CFG, max_running_requests=1)
    async with serve(replica) as url:
        long_body = completion_body(max_tokens=5_000, ignore_eos=True, stream=True)
        first = await http.post(f"{url}/v1/completions", json=long_body)
        await first.content.readuntil(b"\n\n")
        short_body = completion_body(max_tokens=1)
        second = asyncio.create_task(post_json(http, f"{url}/v1/completions", short_body))

        async def one_waiting() -> bool:
            return replica.gauges().num_waiting == 1

        await poll_until(one_waiting)
        assert replica.server_load() == 2
        first.close()
        reply = await second
        assert reply["usage"]["completion_tokens"] == 1
        assert replica.stats.queue_s.count == 2 and replica.stats.queue_s.sum > 0


async def test_fleet_serves_each_replica_on_its_own_port(http: aiohttp.ClientSession) -> None:
    fleet = await start_fleet(msgspec.structs.replace(CFG, replicas=2), ports=[0, 0])
    try:
        assert len(set(fleet.urls)) == 2 and len(fleet.replicas) == 2
        body = completion_body(max_tokens=3, ignore_eos=True)
        replies = [await post_json(http, f"{url}/v1/completions", body) for url in fleet.urls]
        # Same seed, same prompt: the same answer on either replica.
        assert replies[0]["choices"][0]["text"] == replies[1]["choices"][0]["text"]
        assert [replica.stats.generation_tokens for replica in fleet.replicas] == [3, 3]
    finally:
        await fleet.aclose()


async def test_cli_prints_urls_and_stops_on_sigterm() -> None:
    # One replica on base port 0: it picks a free port and prints it.
    args = ["--replicas", "1", "--base-port", "0", "--model", "cli-model"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtests.simulator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        assert line.startswith("replica 0 listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as response:
            assert (await response.json())["data"][0]["id"] == "cli-model"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
