"""A request's placement priority, end to end: the tenant's range stored in
Redis with the tenant, the `x-priority` header clamped into it, and the
PlaceRequest the ingress sends (watched on NATS beside the scheduler)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import aiohttp
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from actors.control_plane import TENANT_KEY, ControlPlane, tenant_with_key
from actors.control_store import connect_redis
from scheduler.control import PRIORITY_FIELDS, SYSTEM
from scheduler.priority import DEFAULT_PRIORITY, PRIORITY_HEADER, PriorityRange
from scheduler.wire import place_request_decoder, place_subject
from tests.harness import MODEL, Switchyard

pytestmark = pytest.mark.integration
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest_asyncio.fixture
async def tenants(switchyard: Switchyard) -> AsyncIterator[ControlPlane]:
    redis = connect_redis(switchyard.cfg.redis)
    yield ControlPlane(redis, switchyard.cfg.auth, None)
    await redis.aclose()


@pytest_asyncio.fixture
async def bus(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def test_priority_comes_from_the_tenant_and_the_header_within_its_range(
        switchyard: Switchyard, tenants: ControlPlane, bus: NATS) -> None:
    tenant, issued = await tenant_with_key(tenants, "prio-" + secrets.token_hex(4),
                                           PriorityRange(default=1, lowest=-1, highest=2))
    tenant_id, key = tenant.tenant_id, issued.plaintext
    # A plain subscriber hears every placement request the scheduler's queue group gets.
    watch = await bus.subscribe(place_subject(MODEL))
    await bus.flush()
    async with aiohttp.ClientSession() as http:
        for asked, priority in [(None, 1), ("-1", -1), ("9", 2), (" 0 ", 0)]:
            headers = {"Authorization": f"Bearer {key}"}
            if asked is not None:
                headers[PRIORITY_HEADER] = asked
            async with http.post(f"{switchyard.base_url}/chat/completions", json=BODY,
                                 headers=headers) as response:
                assert response.status == 200, await response.text()
            while (req := place_request_decoder.decode(
                    (await watch.next_msg(timeout=5)).data)).tenant_id != tenant_id:
                pass
            assert req.priority == priority
            assert req.max_queue_s == switchyard.cfg.ingress.max_queue_s
        async with http.post(f"{switchyard.base_url}/chat/completions", json=BODY,
                             headers={"Authorization": f"Bearer {key}",
                                      PRIORITY_HEADER: "urgent"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == PRIORITY_HEADER


async def test_a_tenants_range_is_stored_with_it_and_defaults_when_absent(
        tenants: ControlPlane) -> None:
    tenant, _ = await tenant_with_key(tenants, "range-" + secrets.token_hex(4))
    assert tenant.priority == DEFAULT_PRIORITY
    wider = PriorityRange(default=0, lowest=-3, highest=5)
    await tenants.update_tenant(SYSTEM, "req-range", tenant.tenant_id, priority=wider)
    stored = await tenants.tenant(tenant.tenant_id)
    assert stored is not None and stored.priority == wider
    # Tenants stored before priorities existed have no such fields.
    await tenants.redis.hdel(TENANT_KEY.format(tenant_id=tenant.tenant_id), *PRIORITY_FIELDS)
    stored = await tenants.tenant(tenant.tenant_id)
    assert stored is not None and stored.priority == DEFAULT_PRIORITY
