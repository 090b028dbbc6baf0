"""Precise prefix routing in front of the two real vLLM replicas: the block
hashes the ingress computes for a prompt (tiny model's tokenizer and chat
template, block size 32 as deploy/vllm.py runs vLLM) are the ones vLLM
announces in its KV events, a repeated long prefix goes to the replica that
holds it, and vLLM's own prefix-cache hit counters confirm.

The session's vLLM replicas publish their KV events to one SUB socket
(tests/fixtures_vllm.py), so a forwarder stands in for the agents' relay
here: it publishes each recorded batch verbatim as a KvEventsRelay. A stack
of its own (NATS, Redis db 6, the scheduler service in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
import pytest_asyncio
from aiohttp import web
from nats.aio.client import Client as NATS

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import ReplicaRegistry, connect_redis
from actors.quota import QuotaService
from actors.scheduler import SchedulerService
from deploy.procs import LOOPBACK, free_port, start_nats
from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.kv_event_sink import KvEventSink
from router.app import create_app
from router.prompt_blocks import request_block_hashes
from router.prompt_tokens import load_tokenizer
from router.requests import parse_request
from scheduler.config import IngressConfig, ModelConfig, SchedulerConfig
from scheduler.framework import ReplicaId
from scheduler.wire import USAGE_SUBJECTS, KvEventsRelay, ReplicaInfo, encode, kv_subject
from tests.fixtures_vllm import VllmReplicas
from tests.harness import (
    MODEL,
    chat_replica,
    make_config,
    prefix_hits_tokens,
    price_models,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

# About 600 tokens: 18 full blocks of 32, well inside max_model_len.
SYSTEM = (TINY_MODEL_DIR / "corpus.txt").read_text()[:1_600]
FOLLOW_UPS = 3
FIXED = {"ignore_eos": True, "min_tokens": 2}
SETTINGS = ModelConfig(tokenizer_dir=str(TINY_MODEL_DIR), block_size_tokens=32)
# vLLM on 2 busy cores: its events and answers take a while.
DEADLINE_S = 30.0


@dataclass
class VllmPreciseStack:
    api: str
    key: str
    scheduler: SchedulerService
    urls: dict[str, str]
    # The tenant's: the ingress hashes prompts with it, as vLLM does.
    cache_salt: str


async def _forward(sink: KvEventSink, topic: str, replica_id: str, nc: NATS) -> None:
    """The agent's relay, for events that arrive at the session's sink."""
    sent = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await sink.wait_for(topic, lambda m, n=sent: len(m) > n, timeout_s=1.0)
        for message in sink.messages(topic)[sent:]:
            await nc.publish(kv_subject(MODEL, replica_id), encode(KvEventsRelay(
                replica_id=replica_id, model=MODEL, seq=message.seq, payload=message.payload)))
            sent += 1


@pytest_asyncio.fixture(scope="module")
async def vllm_precise(session_dir: Path, redis_url: str,
                       vllm_replicas: VllmReplicas) -> AsyncIterator[VllmPreciseStack]:
    work = session_dir / "vllm-precise"
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    base = make_config(work, nats_url, redis_url.removesuffix("/0") + "/6")
    cfg = msgspec.structs.replace(
        base, ingress=IngressConfig(port=free_port()), models={MODEL: SETTINGS},
        scheduler=SchedulerConfig(profile="prefix-precise"))
    assert all(spec.block_size_tokens == SETTINGS.block_size_tokens
               for spec in vllm_replicas.specs)
    redis = connect_redis(cfg.redis)
    await redis.flushdb()
    urls = {f"ext-{i}": url for i, url in enumerate(vllm_replicas.urls)}
    for rid, url in urls.items():
        await ReplicaRegistry(redis).put_replica(ReplicaInfo(id=rid, url=url, models=(MODEL,)))
    await price_models(redis, [MODEL])
    tenant, key = await tenant_with_key(ControlPlane(redis, cfg.auth, None), "vllm-precise")
    await redis.aclose()
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name=cfg.nats.usage_stream, subjects=[USAGE_SUBJECTS])
    scheduler = SchedulerService(cfg, random.Random(3))
    await scheduler.start()
    quota = QuotaService(cfg, 0)  # the admission of every request asks it
    await quota.start()
    forwarders = [asyncio.create_task(_forward(vllm_replicas.kv_events, spec.kv_events.topic,
                                               rid, nc), name=f"forward-{rid}")
                  for rid, spec in zip(urls, vllm_replicas.specs, strict=True)
                  if spec.kv_events is not None]
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, cfg.ingress.port).start()
    yield VllmPreciseStack(f"http://{LOOPBACK}:{cfg.ingress.port}/v1", key.plaintext,
                           scheduler, urls, tenant.cache_salt)
    await runner.cleanup()
    for task in forwarders:
        task.cancel()
    await asyncio.gather(*forwarders, return_exceptions=True)
    await scheduler.aclose()
    await quota.aclose()
    await nc.drain()
    await nats_proc.stop()


def _conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _hashes(messages: list[dict[str, str]], cache_salt: str, *,
            add_generation_prompt: bool = True) -> tuple[int, ...]:
    body = json.dumps({"model": MODEL, "messages": messages,
                       "add_generation_prompt": add_generation_prompt}).encode()
    hashes = request_block_hashes(load_tokenizer(str(TINY_MODEL_DIR)), SETTINGS,
                                  parse_request("chat", body).body, cache_salt)
    assert hashes
    return hashes


def _body(messages: list[dict[str, str]]) -> dict[str, object]:
    return {"model": MODEL, "messages": messages, "max_tokens": 2, **FIXED}


async def test_real_vllm_holds_the_ingress_blocks_and_gets_the_repeats(
        vllm_precise: VllmPreciseStack) -> None:
    stack = vllm_precise
    core = stack.scheduler.core
    first = _conversation("Question 0: which replica has seen this?")
    first_hashes = _hashes(first, stack.cache_salt)
    shared = len(_hashes([first[0]], stack.cache_salt, add_generation_prompt=False)) - 1
    assert shared >= 15
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        home = await chat_replica(session, stack.api, stack.key, _body(first))
        other = next(rid for rid in stack.urls if rid != home)

        async def learned() -> bool:
            held = core.state.precise.longest_prefix(first_hashes, [ReplicaId(home)])
            return held[ReplicaId(home)] == len(first_hashes)

        # The ingress's hashes are the blocks vLLM announced, every one of them.
        await wait_until(learned, DEADLINE_S)
        hits_before = {rid: await prefix_hits_tokens(session, url)
                       for rid, url in stack.urls.items()}
        for n in range(1, FOLLOW_UPS + 1):
            async def settled() -> bool:
                return core.in_flight_count() == 0

            await wait_until(settled, DEADLINE_S)
            follow_up = _conversation(f"Question {n}: and then?")
            placed = await chat_replica(session, stack.api, stack.key, _body(follow_up))
            assert placed == home, f"follow-up {n} went to {placed}"
            scores = core.explain_last()["candidates"]  # type: ignore[index]
            assert scores[home]["scores"]["prefix-precise"] > 0.5
            assert scores[other]["scores"]["prefix-precise"] == 0.0
        hits_after = {rid: await prefix_hits_tokens(session, url)
                      for rid, url in stack.urls.items()}
    assert hits_after[home] - hits_before[home] >= FOLLOW_UPS * shared * SETTINGS.block_size_tokens
    assert hits_after[other] == hits_before[other]
