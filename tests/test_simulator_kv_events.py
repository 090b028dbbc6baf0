"""KV-cache events from simulated replicas, read with real ZMQ sockets on
loopback exactly as a router would read vLLM's: a SUB socket the replicas
connect to, and the replay ROUTER of each replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import msgspec
import pytest_asyncio
import zmq
import zmq.asyncio

from loadtests.simulator import SimFleet, start_fleet
from scheduler.block_hash import block_hashes, low64
from scheduler.kv_events import (
    END_SEQ,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_seq,
)
from tests.sim_helpers import CFG, http, post_json

__all__ = ["http"]  # fixture

RECV_TIMEOUT_S = 5.0


@dataclass
class Batch:
    topic: str
    seq: int
    batch: KVEventBatch


@dataclass
class EventRig:
    fleet: SimFleet
    live: asyncio.Queue[Batch]
    ctx: zmq.asyncio.Context


async def collect(sub: zmq.asyncio.Socket, live: asyncio.Queue[Batch]) -> None:
    while True:
        topic, seq, payload = await sub.recv_multipart()
        live.put_nowait(Batch(topic.decode(), decode_seq(seq), decode_batch(payload)))


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[EventRig]:
    """Two replicas whose PUB sockets connect to one SUB bound on loopback."""
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    # libzmq hands a bound SUB's subscription to a newly connected PUB only while
    # the SUB is being serviced, so a receive is pending from the start.
    live: asyncio.Queue[Batch] = asyncio.Queue(1000)
    collector = asyncio.create_task(collect(sub, live))
    cfg = msgspec.structs.replace(
        CFG, replicas=2, cache_blocks=65, max_model_len=1024,
        kv_events_endpoint=f"tcp://127.0.0.1:{port}",
        kv_events_replay_endpoint="tcp://127.0.0.1:0")
    fleet = await start_fleet(cfg, ports=[0, 0])
    try:
        yield EventRig(fleet, live, ctx)
    finally:
        await fleet.aclose()
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        sub.close(linger=0)
        ctx.term()


async def receive(live: asyncio.Queue[Batch]) -> Batch:
    return await asyncio.wait_for(live.get(), RECV_TIMEOUT_S)


async def replay(ctx: zmq.asyncio.Context, endpoint: str, start_seq: int) -> list[Batch]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", encode_seq(start_seq)])
        batches = []
        while True:
            empty, topic, seq, payload = await asyncio.wait_for(dealer.recv_multipart(),
                                                                RECV_TIMEOUT_S)
            assert empty == b""
            if seq == END_SEQ:
                return batches
            batches.append(Batch(topic.decode(), decode_seq(seq), decode_batch(payload)))
    finally:
        dealer.close(linger=0)


async def kv_event_source(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(f"{url}/kv_event_sources") as response:
        sources = await response.json()
    return sources["0"]


def chat(text: str, max_tokens: int = 20) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "ignore_eos": True}


async def test_events_carry_vllms_hashes_and_replay_fills_gaps(
    rig: EventRig, http: aiohttp.ClientSession
) -> None:
    url = rig.fleet.urls[0]
    source = await kv_event_source(http, url)
    assert (source["topic"], source["publisher"]) == ("sim-0", "zmq")
    body = chat("Which replica holds the prefix of this conversation? " * 6)
    await post_json(http, f"{url}/v1/chat/completions", body)
    prompt = (await post_json(http, f"{url}/tokenize", {"messages": body["messages"]}))["tokens"]
    # PUB drops what it sends before the subscription reaches it: replay from 0
    # gives every batch, in order, whatever the live socket saw.
    batches = await replay(rig.ctx, str(source["replay_endpoint"]), 0)
    assert [b.seq for b in batches] == list(range(len(batches))) and batches
    assert {b.topic for b in batches} == {"sim-0"}
    stored = [e for b in batches for e in b.batch.events if isinstance(e, BlockStored)]
    tokens = [t for event in stored for t in event.token_ids]
    assert tokens[: len(prompt) // 16 * 16] == prompt[: len(prompt) // 16 * 16]
    expected = [low64(d) for d in block_hashes(tokens, 16, "sha256")]
    assert [h for event in stored for h in event.block_hashes] == expected
    assert stored[0].parent_block_hash is None and stored[0].block_size == 16
    # Live: the same prompt again. Its hit is not re-announced; the blocks it
    # computes anew are, with the same hashes (the same tokens come out).
    again = await post_json(http, f"{url}/v1/chat/completions", body)
    hit_blocks = again["usage"]["prompt_tokens_details"]["cached_tokens"] // 16
    live = await receive(rig.live)
    while live.topic != "sim-0" or live.seq < len(batches):
        live = await receive(rig.live)
    (event,) = live.batch.events
    assert isinstance(event, BlockStored) and event.parent_block_hash == expected[hit_blocks - 1]
    assert event.block_hashes == expected[hit_blocks : hit_blocks + len(event.block_hashes)]
    assert live.batch.data_parallel_rank == 0 and live.batch.ts > 0


async def test_eviction_is_announced_and_replicas_use_their_topics(
    rig: EventRig, http: aiohttp.ClientSession
) -> None:
    # 64 blocks of 16 tokens: a dozen distinct ~100-token conversations evict.
    for index in range(12):
        text = f"Conversation {index} about routers, replicas and caches. " * 8
        await post_json(http, f"{rig.fleet.urls[1]}/v1/chat/completions", chat(text, 4))
    source = await kv_event_source(http, rig.fleet.urls[1])
    batches = await replay(rig.ctx, str(source["replay_endpoint"]), 0)
    assert {b.topic for b in batches} == {"sim-1"}
    stored = {h for b in batches for e in b.batch.events if isinstance(e, BlockStored)
              for h in e.block_hashes}
    removed = [h for b in batches for e in b.batch.events if isinstance(e, BlockRemoved)
               for h in e.block_hashes]
    assert removed and set(removed) <= stored
    assert len(removed) == len(set(removed))
    # Replay from a later sequence number gives only the tail.
    tail = await replay(rig.ctx, str(source["replay_endpoint"]), len(batches) - 1)
    assert [b.seq for b in tail] == [len(batches) - 1]
