"""Records what a real vLLM replica sends, for the simulator and the
conformance suite: streamed and plain chat and completion bodies, error
bodies, /v1/models, /load, /tokenize, /metrics and a few raw KV-event
messages, into tests/data/vllm_samples/: JSON bodies re-indented, streams
and /metrics byte for byte. index.json gives each file's request and the
response's status, content type and X-Request-Id.

    python -m loadtests.capture_vllm [--url http://127.0.0.1:8000] [--out DIR]

Without --url it starts a replica itself (needs `make vllm`). KV-event
messages are read back from the replica's replay socket, which
GET /kv_event_sources names; they are the bytes its PUB socket sends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from deploy.procs import LOOPBACK, free_port
from deploy.vllm import SERVED_MODEL, KvEventsTarget, VllmReplica, VllmReplicaSpec
from loadtests.kv_event_sink import KvEventSink, KvMessage, replay

PROJECT_DIR = Path(__file__).resolve().parent.parent
OUT_DIR = PROJECT_DIR / "tests" / "data" / "vllm_samples"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)
REPLAY_TIMEOUT_S = 10.0
# Distinct first blocks, so that they fill a small cache and force evictions.
EVICTION_PROMPTS = 48
MESSAGES = [{"role": "system", "content": "You route requests."},
            {"role": "user", "content": "Hello"}]
FIXED_16 = {"ignore_eos": True, "min_tokens": 16, "max_tokens": 16}
CHAT = {"model": SERVED_MODEL, "messages": MESSAGES, **FIXED_16}
COMPLETION = {"model": SERVED_MODEL, "prompt": "Once upon a time " * 8, **FIXED_16}
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
CONTINUOUS = {"stream": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

# (file, method, path, body): in this order, so /metrics counts the requests before it.
REQUESTS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("models.json", "GET", "/v1/models", None),
    ("chat_stream_include_usage.txt", "POST", "/v1/chat/completions", {**CHAT, **STREAM}),
    ("chat_stream_continuous_usage.txt", "POST", "/v1/chat/completions",
     {**CHAT, **CONTINUOUS}),
    ("completion_stream.txt", "POST", "/v1/completions", {**COMPLETION, **STREAM}),
    ("chat.json", "POST", "/v1/chat/completions", CHAT),
    ("completion.json", "POST", "/v1/completions", COMPLETION),
    ("error_unknown_model.json", "POST", "/v1/chat/completions",
     {**CHAT, "model": "no-such-model"}),
    ("error_max_tokens_zero.json", "POST", "/v1/completions", {**COMPLETION, "max_tokens": 0}),
    ("error_max_tokens_too_large.json", "POST", "/v1/completions",
     {**COMPLETION, "min_tokens": 0, "max_tokens": 4096}),
    ("tokenize_prompt.json", "POST", "/tokenize",
     {"model": SERVED_MODEL, "prompt": COMPLETION["prompt"]}),
    ("tokenize_messages.json", "POST", "/tokenize",
     {"model": SERVED_MODEL, "messages": MESSAGES, "add_generation_prompt": True}),
    ("load.json", "GET", "/load", None),
    ("kv_event_sources.json", "GET", "/kv_event_sources", None),
]


async def record(session: aiohttp.ClientSession, url: str, out: Path, name: str, method: str,
                 path: str, body: dict[str, Any] | None) -> dict[str, Any]:
    request_id = f"sample-{Path(name).stem.replace('_', '-')}"
    async with session.request(method, url + path, json=body,
                               headers={"X-Request-Id": request_id}) as resp:
        raw = await resp.read()
        entry = {"request": {"method": method, "path": path, "body": body,
                             "headers": {"X-Request-Id": request_id}},
                 "status": resp.status, "content_type": resp.headers.get("Content-Type"),
                 "x_request_id": resp.headers.get("X-Request-Id")}
    if name.endswith(".json"):
        raw = json.dumps(json.loads(raw), indent=2).encode() + b"\n"
    (out / name).write_bytes(raw)
    return entry


async def fill_and_evict(session: aiohttp.ClientSession, url: str) -> None:
    for n in range(EVICTION_PROMPTS):
        prompt = f"Prompt number {n} fills blocks: " + "tokens of a prefix " * 12
        body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1}
        async with session.post(url + "/v1/completions", json=body) as resp:
            resp.raise_for_status()


def kv_sample(message: KvMessage) -> dict[str, Any]:
    # msgspec turns any bytes (full-digest hashes) into base64 strings.
    payload = msgspec.json.decode(msgspec.json.encode(msgspec.msgpack.decode(message.payload)))
    return {"topic": message.topic, "seq": message.seq,
            "payload_base64": base64.b64encode(message.payload).decode(), "payload": payload}


def pick_kv_messages(messages: list[KvMessage]) -> list[KvMessage]:
    """The first two batches and the first that removes blocks."""
    def removes(message: KvMessage) -> bool:
        events = msgspec.msgpack.decode(message.payload)[1]
        return any(event["type"] == "BlockRemoved" for event in events)
    removal = next((m for m in messages if removes(m)), None)
    picked = messages[:2] + ([removal] if removal else [])
    return list({m.seq: m for m in picked}.values())


async def capture(url: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        for name, method, path, body in REQUESTS:
            index[name] = await record(session, url, out, name, method, path, body)
        await fill_and_evict(session, url)
        index["metrics.txt"] = await record(session, url, out, "metrics.txt", "GET",
                                            "/metrics", None)
    sources = json.loads((out / "kv_event_sources.json").read_text())
    replay_endpoint = sources["0"]["replay_endpoint"]
    messages = await replay(replay_endpoint, start_seq=0, timeout_s=REPLAY_TIMEOUT_S)
    samples = [kv_sample(m) for m in pick_kv_messages(messages)]
    (out / "kv_events.json").write_text(json.dumps(samples, indent=2) + "\n")
    index["kv_events.json"] = {"source": f"replay from seq 0 at {replay_endpoint}",
                               "batches_replayed": len(messages)}
    (out / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


async def capture_own_replica(out: Path) -> None:
    """Starts a replica with a small KV cache (so eviction happens), captures, stops it."""
    work_dir = PROJECT_DIR / "var" / "vllm" / "capture"
    sink = KvEventSink()  # its PUB socket connects here, as in production
    await sink.start()
    kv_events = KvEventsTarget(endpoint=sink.endpoint, topic="capture",
                               replay_endpoint=f"tcp://{LOOPBACK}:{free_port()}")
    spec = VllmReplicaSpec(port=free_port(), cpu_core=0, work_dir=work_dir, kv_blocks=64,
                           kv_events=kv_events)
    replica = VllmReplica(spec, work_dir / "vllm.log")
    try:
        await replica.start()
        await capture(spec.url, out)
    finally:
        await replica.stop()
        await sink.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running replica; default: start one")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    if args.url:
        asyncio.run(capture(args.url.rstrip("/"), args.out))
    else:
        asyncio.run(capture_own_replica(args.out))


if __name__ == "__main__":
    main()
