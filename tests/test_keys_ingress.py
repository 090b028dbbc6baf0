"""What the ingress enforces from the control plane, on the session's stack:
suspended tenants and platform keys (403), model allowlists (404, and
/v1/models filtered), expired, revoked and rotated keys (401; a revocation
reaches the ingress by broadcast), keys in URLs (401), and tenant isolation
in the replicas' prefix caches: each tenant's own salt upstream, never the
client's, and no client-chosen upstream."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest
import pytest_asyncio

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import connect_redis
from actors.control_tx import nats_publisher
from scheduler.control import SYSTEM
from tests.harness import MODEL, Switchyard, wait_until

pytestmark = pytest.mark.integration
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 2}
# The ingress must see a revocation within this long of its commit.
BROADCAST_DEADLINE_S = 1.0


@pytest_asyncio.fixture
async def plane(switchyard: Switchyard, nats_url: str) -> AsyncIterator[ControlPlane]:
    redis = connect_redis(switchyard.cfg.redis)
    nc = await nats.connect(nats_url)
    yield ControlPlane(redis, switchyard.cfg.auth, nats_publisher(nc))
    await nc.drain()
    await redis.aclose()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _chat(http: aiohttp.ClientSession, yard: Switchyard, key: str,
                body: dict[str, Any] = BODY, path: str = "/chat/completions"
                ) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with http.post(yard.base_url + path, json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_suspension_and_platform_keys_are_403(
        switchyard: Switchyard, plane: ControlPlane, http: aiohttp.ClientSession) -> None:
    tenant, key = await tenant_with_key(plane, "suspend-" + secrets.token_hex(3))
    assert (await _chat(http, switchyard, key.plaintext))[0] == 200
    await plane.suspend_tenant(SYSTEM, "req-s", tenant.tenant_id)

    async def refused() -> bool:
        status, body, _ = await _chat(http, switchyard, key.plaintext)
        return status == 403 and body["error"]["code"] == "permission_denied"

    await wait_until(refused, timeout_s=BROADCAST_DEADLINE_S)
    await plane.resume_tenant(SYSTEM, "req-r", tenant.tenant_id)

    async def served() -> bool:
        return (await _chat(http, switchyard, key.plaintext))[0] == 200

    await wait_until(served, timeout_s=BROADCAST_DEADLINE_S)
    platform = await plane.bootstrap_platform_key("req-p")
    status, body, _ = await _chat(http, switchyard, platform.plaintext)
    assert status == 403 and body["error"]["type"] == "permission_error"
    async with http.get(switchyard.base_url + "/models",
                        headers={"Authorization": f"Bearer {platform.plaintext}"}) as resp:
        assert resp.status == 403


async def test_a_model_outside_the_allowlist_does_not_exist(
        switchyard: Switchyard, plane: ControlPlane, http: aiohttp.ClientSession) -> None:
    tenant, key = await tenant_with_key(plane, "allow-" + secrets.token_hex(3))
    await plane.update_tenant(SYSTEM, "req-m", tenant.tenant_id, models=("other-model",))

    async def hidden() -> bool:
        status, body, _ = await _chat(http, switchyard, key.plaintext)
        return status == 404 and body["error"]["code"] == "model_not_found"

    await wait_until(hidden, timeout_s=BROADCAST_DEADLINE_S)
    # The same answer as for a model nobody serves.
    _, unknown, _ = await _chat(http, switchyard, switchyard.api_key,
                                {**BODY, "model": "no-such-model"})
    _, denied, _ = await _chat(http, switchyard, key.plaintext)
    assert denied["error"] == {**unknown["error"],
                               "message": unknown["error"]["message"].replace(
                                   "no-such-model", MODEL)}
    async with http.get(switchyard.base_url + "/models",
                        headers={"Authorization": f"Bearer {key.plaintext}"}) as resp:
        assert resp.status == 200 and (await resp.json())["data"] == []
    await plane.update_tenant(SYSTEM, "req-m2", tenant.tenant_id, models=(MODEL,))
    await wait_until(lambda: _ok(http, switchyard, key.plaintext),
                     timeout_s=BROADCAST_DEADLINE_S)


async def _ok(http: aiohttp.ClientSession, yard: Switchyard, key: str) -> bool:
    return (await _chat(http, yard, key))[0] == 200


async def test_expired_and_revoked_keys_are_401(
        switchyard: Switchyard, plane: ControlPlane, http: aiohttp.ClientSession) -> None:
    tenant, key = await tenant_with_key(plane, "expiry-" + secrets.token_hex(3))
    expired = await plane.create_key(SYSTEM, "req-e", tenant.tenant_id,
                                     expires_at_s=int(time.time()) - 1)
    assert (await _chat(http, switchyard, expired.plaintext))[0] == 401
    assert await _ok(http, switchyard, key.plaintext)  # cached now
    revoked_at_s = time.monotonic()
    await plane.revoke_key(SYSTEM, "req-v", key.record.key_id)

    async def refused() -> bool:
        return (await _chat(http, switchyard, key.plaintext))[0] == 401

    await wait_until(refused, timeout_s=BROADCAST_DEADLINE_S)
    # Well inside the cache TTL: the broadcast did it.
    assert time.monotonic() - revoked_at_s < switchyard.cfg.ingress.key_cache_ttl_s


async def test_a_key_in_the_query_string_is_refused_and_never_used(
        switchyard: Switchyard, http: aiohttp.ClientSession) -> None:
    for query in ({"api_key": switchyard.api_key}, {"q": switchyard.api_key},
                  {"token": "x"}):
        async with http.post(switchyard.base_url + "/chat/completions", json=BODY,
                             params=query) as resp:
            assert resp.status == 401
        # Even beside a valid header.
        async with http.post(switchyard.base_url + "/chat/completions", json=BODY,
                             params=query,
                             headers={"Authorization": f"Bearer {switchyard.api_key}"}) as resp:
            assert resp.status == 401
            assert "URL" in (await resp.json())["error"]["message"]


async def test_each_tenant_gets_its_own_salt_upstream_and_no_client_choice(
        switchyard: Switchyard, plane: ControlPlane, http: aiohttp.ClientSession) -> None:
    salts = {}
    for name in ("iso-a", "iso-b"):
        tenant, key = await tenant_with_key(plane, name + "-" + secrets.token_hex(3))
        for client_salt in (None, "chosen-by-client"):
            body = BODY if client_salt is None else {**BODY, "cache_salt": client_salt}
            status, _, headers = await _chat(http, switchyard, key.plaintext, body)
            assert status == 200
            replica = switchyard.replica_of(headers["x-switchyard-replica"])
            record = replica.ledger.get(headers["x-request-id"])
            assert record is not None and record.cache_salt == tenant.cache_salt
        salts[name] = tenant.cache_salt
    assert salts["iso-a"] != salts["iso-b"]
    for field in ("api_base", "base_url"):
        status, body, _ = await _chat(http, switchyard, switchyard.api_key,
                                      {**BODY, field: "http://169.254.169.254/latest"})
        assert status == 400 and body["error"]["param"] == field
