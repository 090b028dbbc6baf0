"""The admin API over HTTP against the real control plane (Redis db 11):
bad input is a 400 with the OpenAI error body (never a 5xx); every mutation
leaves exactly one audit entry carrying the call's request id; tenant admins
see only their tenant's audit entries; a route outside the operation table
is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from actors.control_tx import audit_entries, verify_audit
from router.admin_app import create_admin_app
from scheduler.admin_api import OPERATIONS
from scheduler.control import SYSTEM
from tests.admin_stack import AdminStack, running_admin

pytestmark = pytest.mark.integration
T = "/admin/v1/tenants"


@pytest_asyncio.fixture(scope="module")
async def admin(tmp_path_factory: pytest.TempPathFactory, private_bus: str,
                redis_url: str) -> AsyncIterator[AdminStack]:
    async with running_admin(tmp_path_factory.mktemp("admin-api"), private_bus,
                             redis_url) as stack:
        yield stack


async def _call(admin: AdminStack, method: str, path: str, identity: str = "platform", *,
                body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    sent = {"Authorization": f"Bearer {admin.keys[identity]}", **(headers or {})}
    async with aiohttp.ClientSession() as session, session.request(
            method, admin.url + path, json=body, data=data, headers=sent) as resp:
        return resp.status, await resp.json(), resp.headers.get("x-request-id", "")


@pytest.mark.parametrize(("method", "path", "body", "param"), [
    ("POST", T, {"name": ""}, "name"),
    ("POST", T, {"name": "ok", "limits": {"rpm": 5}}, "limits"),
    ("POST", T, {"name": "ok", "limits": {"requests_per_minute": -1}}, "limits"),
    ("POST", T, {"name": "ok", "limits": {"budget_period": "week"}}, "limits.budget_period"),
    ("POST", T, {"name": "ok", "priority": {"default": 5, "lowest": -1, "highest": 0}},
     "priority"),
    ("POST", T, {"name": "ok", "extra": 1}, None),
    ("POST", T, {"name": 7}, "name"),
    ("POST", T, [], None),
    ("PATCH", T + "/{a}", {}, None),
    ("POST", T + "/{a}/keys", {"role": "root"}, "role"),
    ("POST", T + "/{a}/keys", {"expires_at_s": -5}, "expires_at_s"),
    ("POST", T + "/{a}/keys", {"expires_at_s": 1_000_000}, "expires_at_s"),
    ("POST", "/admin/v1/keys/{k}/rotate", {"grace_s": -1}, "grace_s"),
    ("POST", "/admin/v1/prices/m", {"effective_from_s": 4102444800}, None),
    ("POST", "/admin/v1/prices/m", {"effective_from_s": 1, "input_nusd_per_token": 1,
                                    "cached_input_nusd_per_token": 1,
                                    "output_nusd_per_token": 1}, "effective_from_s"),
    ("GET", "/admin/v1/audit?limit=0", None, "limit"),
    ("GET", "/admin/v1/audit?after_version=x", None, "after_version"),
])
async def test_bad_input_is_a_400_with_the_openai_body(
        admin: AdminStack, method: str, path: str, body: Any, param: str | None) -> None:
    key_id = await admin.new_key(admin.tenant_a)
    path = path.replace("{a}", admin.tenant_a).replace("{k}", key_id)
    status, answer, request_id = await _call(admin, method, path, body=body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert answer["error"]["param"] == param
    assert request_id.startswith("adm-")


@pytest.mark.parametrize(("data", "content_type"), [
    (b"{not json", "application/json"),
    (b'{"name": "x"', "application/json"),
    (b"\xff\xfe", "application/json"),
    (b'{"name": "form"}', "application/x-www-form-urlencoded"),
])
async def test_malformed_bodies_are_400s(admin: AdminStack, data: bytes,
                                         content_type: str) -> None:
    status, answer, _ = await _call(admin, "POST", T, data=data,
                                    headers={"Content-Type": content_type})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"


async def test_states_and_lookups_map_to_their_statuses(admin: AdminStack) -> None:
    assert (await _call(admin, "POST", T, body={"name": "tenant-a"}))[0] == 409
    assert (await _call(admin, "GET", T + "/t-nosuchtenant"))[0] == 404
    assert (await _call(admin, "GET", "/admin/v1/keys/nosuchkey"))[0] == 404
    assert (await _call(admin, "GET", "/admin/v1/nothing-here"))[0] == 404
    assert (await _call(admin, "DELETE", T))[0] == 405
    # A key in the URL is refused even beside a valid header, and the refusal has its id.
    status, _, request_id = await _call(admin, "GET", f"{T}?api_key={admin.keys['platform']}")
    assert status == 401 and request_id.startswith("adm-")
    # Only a declared `tenant_id` parameter names the call's tenant.
    assert (await _call(admin, "GET", f"/admin/v1/prices?tenant_id={admin.tenant_b}",
                        "a_viewer"))[0] == 200
    # A tenant admin cannot mint a key above its own role.
    status, answer, _ = await _call(admin, "POST", f"{T}/{admin.tenant_a}/keys", "a_admin",
                                    body={"role": "platform_admin"})
    assert status == 403 and answer["error"]["code"] == "permission_denied"
    key_id = await admin.new_key(admin.tenant_a)
    assert (await _call(admin, "POST", f"/admin/v1/keys/{key_id}/revoke"))[0] == 200
    # Revoked keys cannot be rotated.
    assert (await _call(admin, "POST", f"/admin/v1/keys/{key_id}/rotate"))[0] == 409


async def test_every_mutation_leaves_one_audit_entry_with_its_request_id(
        admin: AdminStack) -> None:
    redis = admin.plane.redis
    calls: list[tuple[str, str, str, Any]] = []

    async def mutate(method: str, path: str, identity: str = "platform",
                     body: Any = None) -> Any:
        status, answer, request_id = await _call(admin, method, path, identity, body=body)
        assert status in (200, 201), answer
        calls.append((method, path, request_id, answer))
        return answer

    tenant = await mutate("POST", T, body={"name": "audited", "models": ["m"]})
    t = f"{T}/{tenant['tenant_id']}"
    await mutate("PATCH", t, body={"limits": {"tokens_per_minute": 1000}})
    await mutate("POST", t + "/suspend")
    await mutate("POST", t + "/resume")
    issued = await mutate("POST", t + "/keys", body={"name": "k", "role": "tenant_admin"})
    assert issued["key"].startswith("sy-") and issued["record"]["hint"] == issued["key"][-4:]
    own = await mutate("POST", f"{T}/{admin.tenant_a}/keys", "a_admin", body={"name": "mine"})
    rotated = await mutate("POST", f"/admin/v1/keys/{own['record']['key_id']}/rotate",
                           "a_admin", body={"grace_s": 60})
    await mutate("POST", f"/admin/v1/keys/{rotated['record']['key_id']}/revoke", "a_admin")
    await mutate("POST", "/admin/v1/prices/m", body={
        "effective_from_s": 4102444800, "input_nusd_per_token": 150,
        "cached_input_nusd_per_token": 75, "output_nusd_per_token": 600})

    entries = await audit_entries(redis)
    for method, path, request_id, _ in calls:
        matching = [e for e in entries if e.request_id == request_id]
        assert len(matching) == 1, (method, path, matching)
    assert (await verify_audit(redis)).ok
    # Listing keys shows hints, never plaintext or digests.
    _, listing, _ = await _call(admin, "GET", t + "/keys")
    assert [k["hint"] for k in listing["data"]] == [issued["key"][-4:]]
    assert issued["key"] not in str(listing) and "digest" not in str(listing)
    # Revoking again changes nothing and records nothing.
    count = len(entries)
    await _call(admin, "POST", f"/admin/v1/keys/{rotated['record']['key_id']}/revoke")
    assert len(await audit_entries(redis)) == count


async def test_tenant_admins_see_only_their_tenants_audit_entries(admin: AdminStack) -> None:
    await _call(admin, "POST", f"{T}/{admin.tenant_b}/keys", "b_admin", body={"name": "b"})
    await _call(admin, "POST", f"{T}/{admin.tenant_a}/keys", "a_admin", body={"name": "a"})
    _, everything, _ = await _call(admin, "GET", "/admin/v1/audit?limit=1000")
    _, own, _ = await _call(admin, "GET", "/admin/v1/audit?limit=1000", "a_admin")
    a = admin.tenant_a
    about_a = [e for e in everything["data"]
               if e["target"] == a or f'"tenant_id":"{a}"' in e["before"] + e["after"]]
    assert own["data"] == about_a and 0 < len(about_a) < len(everything["data"])
    # Asking for another tenant's entries is asking for something that is not there.
    assert (await _call(admin, "GET", f"/admin/v1/audit?tenant_id={admin.tenant_b}",
                        "a_admin"))[0] == 404
    # Pages follow one another without gaps or repeats.
    seen, after = [], 0
    while True:
        _, page, _ = await _call(admin, "GET", f"/admin/v1/audit?limit=3&after_version={after}")
        seen += [e["version"] for e in page["data"]]
        if not (after := page["next_after_version"]):
            break
    assert seen == [e["version"] for e in everything["data"]]


async def test_a_route_outside_the_operation_table_is_refused(admin: AdminStack) -> None:
    async def secret(request: web.Request) -> web.Response:
        return web.json_response({"leaked": True})

    app = create_admin_app(admin.cfg)
    app.router.add_get("/admin/v1/secret", secret)
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
    assert {(op.method, op.path) for op in OPERATIONS} < registered
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/admin/v1/secret",
                                headers={"Authorization": f"Bearer {admin.keys['platform']}"})
        assert resp.status == 403 and "leaked" not in await resp.text()


async def test_a_suspended_tenants_keys_are_refused(admin: AdminStack) -> None:
    path = f"{T}/{admin.tenant_b}"
    assert (await _call(admin, "GET", path, "b_admin"))[0] == 200
    await admin.plane.suspend_tenant(SYSTEM, "test-suspend", admin.tenant_b)
    try:
        status, answer, _ = await _call(admin, "GET", path, "b_admin")
        assert status == 403 and "suspended" in answer["error"]["message"]
    finally:
        await admin.plane.resume_tenant(SYSTEM, "test-resume", admin.tenant_b)
    assert (await _call(admin, "GET", path, "b_admin"))[0] == 200
