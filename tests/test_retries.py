"""Retries before the first byte and replica ejection, end to end: the real
ingress, scheduler actor, metering (chDB) and simulated replicas with
injected faults. Each test gets a fresh pair of replicas serving a model of
its own, so ejections do not carry over between tests; failover tests run
on an ingress of their own with a budget large enough that it never
decides, and the budget test on one with none."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import msgspec
import nats
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict
from nats.aio.client import Client as NATS

from actors.control_store import ReplicaRegistry, connect_redis
from deploy.procs import LOOPBACK, free_port
from loadtests.simulator.fleet import SimFleet, start_fleet
from loadtests.simulator.replica import SimReplica
from router.app import create_app
from scheduler.config import RetriesConfig
from scheduler.wire import (
    MODELS_SUBJECT,
    REGISTRY_CHANGED_SUBJECT,
    REPLICA_FAILED_SUBJECT,
    USAGE_QUERY_SUBJECT,
    ApiChunk,
    ApiEnd,
    ApiResponse,
    ModelsQuery,
    RegistryChanged,
    ReplicaInfo,
    UsageEvent,
    UsageQuery,
    api_reply_decoder,
    encode,
    models_reply_decoder,
    replica_failed_decoder,
    usage_decoder,
    usage_reply_decoder,
)
from tests.harness import Switchyard, price_models, wait_until

pytestmark = pytest.mark.integration
_pairs = itertools.count()
AMPLE = RetriesConfig(budget_min_retries=1_000)
NONE = RetriesConfig(budget_ratio=0.0, budget_min_retries=0)


@dataclass
class Pair:
    """Two simulated replicas of `model`, ids `ids[0]` and `ids[1]`."""

    model: str
    ids: tuple[str, str]
    fleet: SimFleet
    nc: NATS

    def replica(self, replica_id: str) -> SimReplica:
        return self.fleet.replicas[self.ids.index(replica_id)]

    async def faults(self, index: int, **faults: object) -> None:
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.fleet.urls[index]}/sim/faults", json=faults) as resp:
            assert resp.status == 200


@pytest_asyncio.fixture
async def pair(switchyard: Switchyard) -> AsyncIterator[Pair]:
    n = next(_pairs)
    model = f"retry-model-{n}"
    sim = msgspec.structs.replace(switchyard.cfg.simulator, model=model)
    fleet = await start_fleet(sim, ports=[0, 0])
    ids = (f"retry-{n}-0", f"retry-{n}-1")
    redis = connect_redis(switchyard.cfg.redis)
    nc = await nats.connect(switchyard.cfg.nats.url)
    registry = ReplicaRegistry(redis)
    try:
        for rid, url in zip(ids, fleet.urls, strict=True):
            await registry.put_replica(ReplicaInfo(id=rid, url=url, models=(model,)))
        await price_models(redis, [model])
        await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))

        async def both_known() -> bool:
            reply = await nc.request(MODELS_SUBJECT, encode(ModelsQuery()), timeout=2)
            cards = models_reply_decoder.decode(reply.data).models
            return any(c.id == model and c.replicas == 2 for c in cards)

        await wait_until(both_known, timeout_s=10)
        yield Pair(model, ids, fleet, nc)
    finally:
        for rid in ids:
            await registry.remove_replica(rid)
        await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))
        await nc.drain()
        await redis.aclose()
        await fleet.aclose()


@contextlib.asynccontextmanager
async def ingress(yard: Switchyard, retries: RetriesConfig) -> AsyncIterator[str]:
    """An ingress of its own on the session's bus; yields its /v1 URL."""
    port = free_port()
    cfg = msgspec.structs.replace(
        yard.cfg, retries=retries, ingress=msgspec.structs.replace(yard.cfg.ingress, port=port))
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, port).start()
        yield f"http://{LOOPBACK}:{port}/v1"
    finally:
        await runner.cleanup()


class Heard:
    """Usage events and failure reports published on the bus while it listens."""

    def __init__(self) -> None:
        self.usage: list[UsageEvent] = []
        self.failed: list[tuple[str, str]] = []  # (replica id, request id)

    async def _on_usage(self, msg: object) -> None:
        self.usage.append(usage_decoder.decode(msg.data))  # type: ignore[attr-defined]

    async def _on_failed(self, msg: object) -> None:
        report = replica_failed_decoder.decode(msg.data)  # type: ignore[attr-defined]
        self.failed.append((report.replica_id, report.request_id))


@contextlib.asynccontextmanager
async def listening(nc: NATS) -> AsyncIterator[Heard]:
    heard = Heard()
    subs = [await nc.subscribe("yard.usage.>", cb=heard._on_usage),
            await nc.subscribe(REPLICA_FAILED_SUBJECT, cb=heard._on_failed)]
    await nc.flush()
    try:
        yield heard
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def chat(session: aiohttp.ClientSession, base_url: str, key: str, model: str,
               **fields: object) -> tuple[int, CIMultiDict[str], dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **fields}
    async with session.post(base_url + "/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def metric(base_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(
            base_url.removesuffix("/v1") + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def clickhouse_requests(nc: NATS, tenant_id: str) -> int:
    reply = await nc.request(USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)),
                             timeout=5)
    totals = usage_reply_decoder.decode(reply.data).totals
    return sum(t.requests for t in totals)


@pytest.mark.parametrize("fault", [{"refuse_connections_s": 1.0}, {"error_status": 500}],
                         ids=["refused", "500"])
async def test_a_failing_replica_fails_no_request_and_is_ejected_then_readmitted(
        switchyard: Switchyard, pair: Pair, fault: dict[str, object]) -> None:
    tenant_id, key = await switchyard.new_tenant(f"retries-{pair.model}")
    bad, good = pair.ids
    served_by: dict[str, str] = {}  # request id -> replica, of every answer

    async def send(session: aiohttp.ClientSession) -> str:
        status, headers, _ = await chat(session, url, key, pair.model)
        assert status == 200
        served_by[headers["x-request-id"]] = headers["x-switchyard-replica"]
        return headers["x-switchyard-replica"]

    await pair.faults(0, **fault)
    async with ingress(switchyard, AMPLE) as url, listening(pair.nc) as heard, \
            aiohttp.ClientSession() as session:
        # Placed at once, so half go to the failing replica before any report.
        assert set(await asyncio.gather(*(send(session) for _ in range(6)))) == {good}
        failed_ids = {rid for _, rid in heard.failed}
        assert {replica for replica, _ in heard.failed} == {bad} and failed_ids
        assert await metric(url, "switchyard_upstream_retries_total") == len(failed_ids)
        # Ejected: everything goes to the good replica while the period lasts.
        assert [await send(session) for _ in range(3)] == [good] * 3
        if "error_status" in fault:
            await pair.faults(0)  # cleared; a refusal ends by itself

        async def readmitted() -> bool:
            return await send(session) == bad

        await wait_until(readmitted, timeout_s=10)

        async def all_metered() -> bool:
            return served_by.keys() <= {e.request_id for e in heard.usage}

        await wait_until(all_metered)
    # One usage event per request, the serving attempt's; none for failed attempts.
    mine = [e for e in heard.usage if e.tenant_id == tenant_id]
    assert sorted(e.request_id for e in mine) == sorted(served_by)
    assert all(e.replica_id == served_by[e.request_id] and e.status == 200 for e in mine)

    async def in_clickhouse() -> bool:
        return await clickhouse_requests(pair.nc, tenant_id) == len(served_by)

    await wait_until(in_clickhouse, timeout_s=15)


async def test_a_stream_that_fails_after_its_first_byte_is_not_retried(
        switchyard: Switchyard, pair: Pair) -> None:
    body = {"model": pair.model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 500, "ignore_eos": True, "stream": True}
    async with ingress(switchyard, AMPLE) as url, listening(pair.nc) as heard, \
            aiohttp.ClientSession() as session:
        async with session.post(url + "/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {switchyard.api_key}"}
                                ) as resp:
            request_id = resp.headers["x-request-id"]
            serving = resp.headers["x-switchyard-replica"]
            assert (await resp.content.readline()).startswith(b"data: ")
            await pair.faults(pair.ids.index(serving), crash=True)
            events = [line async for line in resp.content if line.startswith(b"data: ")]
        assert events and b'"error"' in events[-1] and b"[DONE]" not in b"".join(events)
        other = next(rid for rid in pair.ids if rid != serving)
        assert pair.replica(other).ledger.get(request_id) is None
        assert await metric(url, "switchyard_upstream_retries_total") == 0

        async def metered() -> bool:
            return any(e.request_id == request_id for e in heard.usage)

        await wait_until(metered)
        assert [e.replica_id for e in heard.usage if e.request_id == request_id] == [serving]


async def test_a_4xx_is_the_clients_fault_and_not_retried(
        switchyard: Switchyard, pair: Pair) -> None:
    async with ingress(switchyard, AMPLE) as url, listening(pair.nc) as heard, \
            aiohttp.ClientSession() as session:
        status, _, body = await chat(session, url, switchyard.api_key, pair.model,
                                     max_tokens=5_000)
        assert status == 400 and body["error"]["type"] == "BadRequestError"
        assert await metric(url, "switchyard_upstream_retries_total") == 0
        await pair.nc.flush()
        assert heard.failed == []


async def test_with_the_budget_spent_the_failure_reaches_the_client(
        switchyard: Switchyard, pair: Pair) -> None:
    await pair.faults(0, error_status=500)
    await pair.faults(1, error_status=500)
    async with ingress(switchyard, NONE) as url, listening(pair.nc) as heard, \
            aiohttp.ClientSession() as session:
        status, headers, body = await chat(session, url, switchyard.api_key, pair.model)
        assert status == 502 and body["error"]["code"] == "upstream_failed"
        request_id = headers["x-request-id"]

        async def reported() -> bool:
            return bool(heard.failed)

        await wait_until(reported)
        assert heard.failed == [(body_replica(body, pair), request_id)]
        assert await metric(url, "switchyard_upstream_retry_budget_exhausted_total") == 1
        assert await metric(url, "switchyard_upstream_retries_total") == 0


def body_replica(body: dict, pair: Pair) -> str:
    """The replica named in an upstream failure's message."""
    message = body["error"]["message"]
    return next(rid for rid in pair.ids if f"replica {rid} " in message)


async def test_the_nats_api_fails_over_too(switchyard: Switchyard, pair: Pair) -> None:
    """On the session's ingress, with the default budget (4 requests, about 2 retries)."""
    await pair.faults(0, error_status=503)
    headers = {"Authorization": f"Bearer {switchyard.api_key}"}

    async def one(stream: bool) -> list[object]:
        inbox = pair.nc.new_inbox()
        sub = await pair.nc.subscribe(inbox)
        body = {"model": pair.model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3, "stream": stream}
        await pair.nc.publish("yard.v1.chat.completions", msgspec.json.encode(body),
                              reply=inbox, headers=headers)
        replies: list[object] = []
        while not replies or isinstance(replies[-1], ApiChunk):
            replies.append(api_reply_decoder.decode((await sub.next_msg(timeout=10)).data))
        await sub.unsubscribe()
        return replies

    async with listening(pair.nc) as heard:
        answers = await asyncio.gather(*(one(stream) for stream in (True, False, True, False)))
        await pair.nc.flush()
    assert {replica for replica, _ in heard.failed} == {pair.ids[0]}  # it did fail some
    for stream, replies in zip((True, False, True, False), answers, strict=True):
        if stream:
            assert isinstance(replies[-1], ApiEnd) and len(replies) > 1, replies
        else:
            assert [type(r) for r in replies] == [ApiResponse], replies
