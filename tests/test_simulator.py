"""The replica simulator's API over HTTP, in vLLM's shapes: chat and
completions (whole and streamed), usage, /tokenize, /v1/models, /load,
/metrics and errors. The pure core is in test_simulator_engine.py; aborts,
faults and the CLI in test_simulator_failures.py; KV events in
test_simulator_kv_events.py."""

from __future__ import annotations

import aiohttp
import msgspec
import pytest

from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.simulator import SimFleet
from router.prompt_tokens import load_tokenizer
from tests.sim_helpers import (
    BASE_LABELS,
    BLOCK,
    CFG,
    Json,
    chat_body,
    completion_body,
    fleet,
    ground_truth,
    http,
    post_json,
    post_stream,
    scrape,
)

__all__ = ["fleet", "http"]  # fixtures


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
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    # Full prompt blocks this request added to the cache.
    assert usage["prompt_tokens_details"]["created_cache_tokens"] == (
        usage["prompt_tokens"] // BLOCK * BLOCK)
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
    details = usage_chunk["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": 0, "created_cache_tokens": details["created_cache_tokens"]}
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
    assert card["root"].endswith("tiny_model") and card["parent"] is None
    assert card["max_model_len"] == 1024
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
    assert samples[("vllm:num_preemptions_created", BASE_LABELS)] > 0


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


async def test_tokenize_gives_the_ids_the_engine_sees(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    messages = chat_body()["messages"]
    tokens = await post_json(http, f"{url}/tokenize", {"model": CFG.model, "messages": messages})
    assert tokens["tokens"] == load_tokenizer(str(TINY_MODEL_DIR)).encode_chat(messages)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    assert tokens["token_strs"] is None
    reply = await post_json(http, f"{url}/v1/chat/completions", chat_body(max_tokens=1))
    assert reply["usage"]["prompt_tokens"] == tokens["count"]
    body = {"prompt": "a router", "return_token_strs": True}
    plain = await post_json(http, f"{url}/tokenize", body)
    assert plain["tokens"] == load_tokenizer(str(TINY_MODEL_DIR)).encode("a router")
    assert plain["token_strs"] == ["a", "Ġrou", "ter"]


async def test_stream_text_is_the_detokenized_output(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = chat_body(max_tokens=40, ignore_eos=True, stream=True)
    events = await post_stream(http, f"{fleet.urls[0]}/v1/chat/completions", body)
    deltas = [chunk["choices"][0]["delta"]["content"] for chunk in events[1:]]
    assert len(deltas) == 40
    # Random byte-level tokens often end mid-character: those chunks carry "".
    assert "" in deltas and "".join(deltas)


async def test_kv_event_sources_is_empty_without_events(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{fleet.urls[0]}/kv_event_sources") as response:
        assert await response.json() == {}
