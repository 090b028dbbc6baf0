"""The simulator answers like real vLLM 0.32: the requests recorded in
tests/data/vllm_samples (captured from vLLM serving the tiny model, block
size 32) are replayed in their order against a simulated replica configured
the same way, and each answer must have the recorded shape: the same keys
in the same order, values of the same types, the same status and content
type, the same number of stream events; usage, token ids and error bodies
must be equal outright. Generated text differs (other weights), so it is
compared by type only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from loadtests.simulator import SimFleet, start_fleet
from tests.sim_helpers import http

__all__ = ["http"]  # fixture

SAMPLES = Path(__file__).resolve().parent / "data" / "vllm_samples"
INDEX: dict[str, Any] = json.loads((SAMPLES / "index.json").read_text())
# The capture's order: what earlier requests cached shows in later usage.
ORDER = [
    "models.json", "chat_stream_include_usage.txt", "chat_stream_continuous_usage.txt",
    "completion_stream.txt", "chat.json", "completion.json", "error_unknown_model.json",
    "error_max_tokens_zero.json", "error_max_tokens_too_large.json", "tokenize_prompt.json",
    "tokenize_messages.json", "load.json", "kv_event_sources.json",
]
# Keys whose values must be equal, not only of the same type.
EXACT_KEYS = {"object", "model", "usage", "finish_reason", "stop_reason", "role", "index",
              "max_model_len", "owned_by", "count", "tokens", "error", "server_load",
              "token_strs", "publisher", "enable_kv_cache_events", "buffer_steps", "hwm",
              "max_queue_size"}


@pytest_asyncio.fixture
async def replica() -> AsyncIterator[SimFleet]:
    from scheduler.config import SimulatorConfig

    cfg = SimulatorConfig(replicas=1, block_size_tokens=32, cache_blocks=64, max_model_len=1024,
                          decode_ms_per_token=0.5, prefill_tokens_per_s=1e7,
                          kv_events_endpoint="tcp://*:0", kv_events_replay_endpoint="tcp://x:0")
    fleet = await start_fleet(cfg, ports=[0])
    yield fleet
    await fleet.aclose()


def assert_same_shape(ours: Any, theirs: Any, path: str = "$") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != {list(theirs)}"
        for key, value in theirs.items():
            if key in EXACT_KEYS:
                assert ours[key] == value, f"{path}.{key}: {ours[key]!r} != {value!r}"
            else:
                assert_same_shape(ours[key], value, f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), path
        for index, (mine, recorded) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_shape(mine, recorded, f"{path}[{index}]")
    else:
        assert type(ours) is type(theirs), f"{path}: {ours!r} vs {theirs!r}"


def sse_events(raw: str) -> list[Any]:
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [msgspec.json.decode(event.removeprefix("data: ")) for event in events[:-2]]


async def replay(http: aiohttp.ClientSession, url: str, name: str) -> None:
    entry = INDEX[name]
    request = entry["request"]
    async with http.request(request["method"], url + request["path"], json=request["body"],
                            headers=request["headers"]) as response:
        assert response.status == entry["status"], await response.text()
        assert response.headers["Content-Type"] == entry["content_type"]
        assert response.headers.get("X-Request-Id") in (None, entry["x_request_id"])
        raw = await response.text()
    recorded = (SAMPLES / name).read_text()
    if name.endswith(".txt"):
        ours, theirs = sse_events(raw), sse_events(recorded)
    else:
        ours, theirs = json.loads(raw), json.loads(recorded)
    assert_same_shape(ours, theirs, name)


async def test_answers_have_vllms_shapes(replica: SimFleet, http: aiohttp.ClientSession) -> None:
    assert set(ORDER) | {"metrics.txt", "kv_events.json"} == set(INDEX)
    for name in ORDER:
        await replay(http, replica.urls[0], name)


async def test_metrics_are_named_and_labelled_as_vllms(
    replica: SimFleet, http: aiohttp.ClientSession
) -> None:
    recorded: dict[str, set[str]] = {}
    for family in text_string_to_metric_families((SAMPLES / "metrics.txt").read_text()):
        for sample in family.samples:
            recorded.setdefault(sample.name, set()).update(sample.labels)
    async with http.get(f"{replica.urls[0]}/metrics") as response:
        text = await response.text()
    ours = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert ours
    for sample in ours:
        assert sample.name in recorded, sample.name
        assert set(sample.labels) <= recorded[sample.name], sample.name
