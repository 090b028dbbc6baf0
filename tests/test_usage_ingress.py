"""What the ingress meters, end to end (real NATS, JetStream, Ray, chDB and
simulated replicas, whose ledger is the ground truth): streams cut short by
their clients (RELIABILITY T16), a non-streaming client that times out
(T17), requests refused before any replica (not billed), and the usage the
client did or did not ask for."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest

from scheduler.wire import UsageEvent, usage_decoder, usage_subject
from tests.harness import MODEL, Switchyard, nats_client, wait_until
from tests.test_metering import query_totals

pytestmark = pytest.mark.integration

LONG = {"max_tokens": 900, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me about rail yards at length."}]
# Tokens a simulated replica (2 ms per token) may generate between the last
# chunk the ingress relayed and the abort, on a loaded machine.
MAX_ABORT_GAP_TOKENS = 10


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def billed(yard: Switchyard, tenant_id: str, requests: int) -> dict[str, UsageEvent]:
    """Waits until the metering service (ClickHouse, FINAL) counts `requests`
    rows for the tenant, then returns the tenant's events from JetStream.
    The wait covers the consumer's ack_wait: deliveries it had not acked when
    its connection to NATS dropped (a test killing NATS) come back only then."""
    timeout_s = 15.0 + yard.cfg.metering.ack_wait_s
    async with nats_client(yard.cfg.nats.url) as nc:
        async def counted() -> bool:
            try:
                totals = await query_totals(nc, tenant_id)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                # The metering service is still reconnecting (after a NATS restart).
                return False
            return bool(totals) and totals[0].requests >= requests

        await wait_until(counted, timeout_s=timeout_s)
        totals = await query_totals(nc, tenant_id)
        assert totals[0].requests == requests
        sub = await nc.jetstream().pull_subscribe(usage_subject(tenant_id),
                                                  stream=yard.cfg.nats.usage_stream)
        events: list[UsageEvent] = []
        while True:
            try:
                msgs = await sub.fetch(500, timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            events += [usage_decoder.decode(m.data) for m in msgs]
            # Acked, or the consumer stops at its max_ack_pending (1,000).
            for msg in msgs:
                await msg.ack()
        await sub.unsubscribe()
        by_id = {e.request_id: e for e in events}
        assert len(by_id) == len(events) == requests
        assert totals[0].completion_tokens == sum(e.completion_tokens for e in events)
        return by_id


async def _cut_stream(session: aiohttp.ClientSession, yard: Switchyard, key: str,
                      events_read: int) -> tuple[str, str, float]:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, **LONG}
    resp = await session.post(yard.base_url + "/chat/completions", json=body,
                              headers=_auth(key))
    assert resp.status == 200
    request_id, replica = resp.headers["x-request-id"], resp.headers["x-switchyard-replica"]
    seen = 0
    while seen < events_read:
        if (await resp.content.readline()).startswith(b"data: "):
            seen += 1
    resp.close()  # the client goes away mid-stream
    return request_id, replica, time.time()


async def test_streams_cut_short_are_billed_the_tokens_generated(switchyard: Switchyard) -> None:
    """T16: each stream is billed once, with the replica's own count of the
    tokens it generated, and the replica stops within 1 s."""
    tenant_id, key = await switchyard.new_tenant("t16")
    rng = random.Random(16)
    async with aiohttp.ClientSession() as session:
        cuts = await asyncio.gather(*(_cut_stream(session, switchyard, key, rng.randint(1, 40))
                                      for _ in range(30)))
    stored = await billed(switchyard, tenant_id, len(cuts))
    for request_id, replica_id, closed_at_s in cuts:
        truth = switchyard.replica_of(replica_id).ledger.get(request_id)
        assert truth is not None and truth.aborted
        assert truth.ended_at_s is not None and truth.ended_at_s - closed_at_s < 1.0
        event = stored[request_id]
        assert event.prompt_tokens == truth.prompt_tokens, request_id
        # Per-chunk usage carries no prompt_tokens_details (vLLM's neither):
        # a stream cut before its final usage chunk bills its prompt uncached.
        assert event.cached_tokens == 0
        # Billed: the replica's own count on the last chunk that reached the
        # ingress. What it generated after that, until it saw the connection
        # close (a few ms), no chunk reports: that gap is bounded, never over.
        gap_tokens = truth.completion_tokens - event.completion_tokens
        assert 0 <= gap_tokens <= MAX_ABORT_GAP_TOKENS, (request_id, gap_tokens)
        assert 0 < event.completion_tokens < 900 and event.status == 499
        assert event.max_tokens == 900 and event.billable


async def test_non_streaming_client_timing_out_is_billed_prompt_and_generated(
        switchyard: Switchyard) -> None:
    """T17: the client leaves while the replica generates its one answer."""
    tenant_id, key = await switchyard.new_tenant("t17")
    body = {"model": MODEL, "messages": MESSAGES, **LONG}
    timeout = aiohttp.ClientTimeout(total=0.4)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(switchyard.base_url + "/chat/completions", json=body,
                                    headers=_auth(key)) as resp:
                await resp.read()
    (event,) = (await billed(switchyard, tenant_id, 1)).values()
    truth = switchyard.replica_of(event.replica_id).ledger.get(event.request_id)
    assert truth is not None and truth.aborted
    assert event.prompt_tokens == truth.prompt_tokens > 0
    assert 0 <= truth.completion_tokens - event.completion_tokens <= MAX_ABORT_GAP_TOKENS
    assert event.completion_tokens > 0
    assert event.status == 499


async def test_requests_refused_before_a_replica_are_not_billed(switchyard: Switchyard) -> None:
    tenant_id, key = await switchyard.new_tenant("refused")
    url = switchyard.base_url + "/chat/completions"
    refused: list[tuple[dict[str, Any], int]] = [
        ({"model": "no-such-model", "messages": MESSAGES}, 404),
        ({"model": MODEL, "messages": []}, 400),
        # The replica refuses it (more than its context): 4xx, never accepted.
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": 5000}, 400),
    ]
    async with aiohttp.ClientSession() as session:
        for body, status in refused:
            async with session.post(url, json=body, headers=_auth(key)) as resp:
                assert resp.status == status, await resp.text()
        async with session.post(url, json={"model": MODEL, "messages": MESSAGES,
                                           "max_tokens": 3}, headers=_auth(key)) as resp:
            assert resp.status == 200
            served_id = resp.headers["x-request-id"]
            answer = await resp.json()
    stored = await billed(switchyard, tenant_id, 1)
    assert list(stored) == [served_id]
    assert stored[served_id].completion_tokens == answer["usage"]["completion_tokens"] == 3
    assert stored[served_id].prompt_tokens == answer["usage"]["prompt_tokens"]


async def _chunks(session: aiohttp.ClientSession, yard: Switchyard,
                  options: dict[str, bool] | None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "Count", "stream": True,
                            "max_tokens": 4, "ignore_eos": True}
    if options is not None:
        body["stream_options"] = options
    async with session.post(yard.base_url + "/completions", json=body,
                            headers=_auth(yard.api_key)) as resp:
        lines = (await resp.text()).split("\n")
    payloads = [line[6:] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


async def test_the_client_gets_exactly_the_usage_it_asked_for(switchyard: Switchyard) -> None:
    async with aiohttp.ClientSession() as session:
        plain = await _chunks(session, switchyard, None)
        final = await _chunks(session, switchyard, {"include_usage": True})
        every = await _chunks(session, switchyard, {"include_usage": True,
                                                     "continuous_usage_stats": True})
    assert len(plain) == 4 and all("usage" not in c for c in plain)
    assert len(final) == 5 and all("usage" not in c for c in final[:-1])
    assert final[-1]["choices"] == [] and final[-1]["usage"]["completion_tokens"] == 4
    assert [c["usage"]["completion_tokens"] for c in every] == [1, 2, 3, 4, 4]


async def test_assembled_answer_matches_the_replicas_own(switchyard: Switchyard) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "ignore_eos": True}
    assert switchyard.fleet is not None
    async with aiohttp.ClientSession() as session:
        async with session.post(switchyard.base_url + "/chat/completions", json=body,
                                headers=_auth(switchyard.api_key)) as resp:
            ours = await resp.json()
        async with session.post(switchyard.fleet.urls[0] + "/v1/chat/completions",
                                json=body) as resp:
            direct = await resp.json()
    assert list(ours) == list(direct)
    assert list(ours["choices"][0]["message"]) == list(direct["choices"][0]["message"])
    assert ours["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 6
    assert ours["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert set(ours["usage"]["prompt_tokens_details"]) == set(
        direct["usage"]["prompt_tokens_details"])
