"""RELIABILITY T9, authz_matrix_bola_bfla: every operation of the served
OpenAPI document x every identity, against the table below, written by hand
(not derived from the policy code, so a policy change that widens or
narrows access fails here until the table says so); 0 mismatches.

Each cell runs on fresh targets: a key operation acts on a key just issued
in tenant A, and tenant A is resumed after a cell that suspended it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from scheduler.control import SYSTEM
from tests.admin_stack import AdminStack, running_admin
from tests.billing_stack import metering_config
from tests.harness import running_metering

pytestmark = pytest.mark.integration

IDENTITIES = ("a_user", "a_viewer", "a_admin", "b_admin", "platform", "revoked", "expired",
              "no_key", "query_key")
_ALL_401 = "401 401 401 401"
# Path and query parameters name tenant A's records; `tenant_id` in the audit
# listing's query too. Columns in the order of IDENTITIES.
EXPECTED = {
    "health":         "200 200 200 200 200 200 200 200 401",
    "openapi":        "200 200 200 200 200 200 200 200 401",
    "list_tenants":   "403 403 403 403 200 " + _ALL_401,
    "create_tenant":  "403 403 403 403 201 " + _ALL_401,
    "get_tenant":     "403 200 200 404 200 " + _ALL_401,
    "update_tenant":  "403 403 403 403 200 " + _ALL_401,
    "suspend_tenant": "403 403 403 403 200 " + _ALL_401,
    "resume_tenant":  "403 403 403 403 200 " + _ALL_401,
    "list_keys":      "403 200 200 404 200 " + _ALL_401,
    "create_key":     "403 403 201 404 201 " + _ALL_401,
    "get_key":        "403 200 200 404 200 " + _ALL_401,
    "rotate_key":     "403 403 201 404 201 " + _ALL_401,
    "revoke_key":     "403 403 200 404 200 " + _ALL_401,
    "list_prices":    "403 200 200 200 200 " + _ALL_401,
    "set_price":      "403 403 403 403 200 " + _ALL_401,
    "list_audit":     "403 403 200 404 200 " + _ALL_401,
    "get_usage":      "403 200 200 404 200 " + _ALL_401,
    "get_statement":  "403 200 200 404 200 " + _ALL_401,
    "dashboard":       "200 200 200 200 200 200 200 200 401",
    "dashboard_asset": "200 200 200 200 200 200 200 200 401",
}


@pytest_asyncio.fixture(scope="module")
async def admin(tmp_path_factory: pytest.TempPathFactory, private_bus: str,
                redis_url: str) -> AsyncIterator[AdminStack]:
    """With a metering service, which answers the usage and statement operations."""
    work = tmp_path_factory.mktemp("admin-authz")
    async with running_admin(work, private_bus, redis_url) as stack:
        async with running_metering(metering_config(stack.cfg, work)):
            yield stack


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, methods in document["paths"].items()
            for method, op in methods.items()]


async def _target(admin: AdminStack, op: dict[str, Any], path: str) -> tuple[str, list]:
    """The cell's URL path and query, every parameter naming tenant A's records."""
    values = {"tenant_id": admin.tenant_a, "model": "switchyard-tiny", "month": "2026-10",
              "asset": "dashboard.js"}
    if "{key_id}" in path:
        values["key_id"] = await admin.new_key(admin.tenant_a)
    query = []
    for param in op.get("parameters", []):
        if param["in"] == "path":
            path = path.replace("{" + param["name"] + "}", values[param["name"]])
        elif param["name"] in values:
            query.append((param["name"], values[param["name"]]))
    return path, query


def _body(op: dict[str, Any]) -> dict[str, Any] | None:
    body = op.get("requestBody")
    if body is None:
        return None
    example = dict(body["content"]["application/json"].get("example", {}))
    if op["operationId"] == "create_tenant":
        example["name"] = "matrix-" + secrets.token_hex(4)
    return example


async def _call(session: aiohttp.ClientSession, admin: AdminStack, identity: str, method: str,
                path: str, query: list, body: dict[str, Any] | None) -> int:
    headers = {}
    if identity == "query_key":
        query = [*query, ("api_key", admin.keys["platform"])]
    elif identity != "no_key":
        headers["Authorization"] = f"Bearer {admin.keys[identity]}"
    async with session.request(method, admin.url + path, params=query, json=body,
                               headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_every_operation_against_every_identity(admin: AdminStack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin.url + "/admin/v1/openapi.json") as resp:
            document = await resp.json()
        operations = _operations(document)
        assert sorted(op["operationId"] for _, _, op in operations) == sorted(EXPECTED)
        mismatches, cells = [], 0
        for method, template, op in operations:
            expected = dict(zip(IDENTITIES, map(int, EXPECTED[op["operationId"]].split()),
                                strict=True))
            for identity in IDENTITIES:
                path, query = await _target(admin, op, template)
                status = await _call(session, admin, identity, method, path, query, _body(op))
                cells += 1
                if status != expected[identity]:
                    mismatches.append((op["operationId"], identity, expected[identity], status))
                tenant = await admin.plane.tenant(admin.tenant_a)
                if tenant is not None and tenant.status != "active":
                    await admin.plane.resume_tenant(SYSTEM, "test-resume", admin.tenant_a)
    assert cells == len(EXPECTED) * len(IDENTITIES)
    assert mismatches == [], "\n".join(
        f"{op} as {who}: expected {want}, got {got}" for op, who, want, got in mismatches)


async def test_the_document_names_each_operations_roles(admin: AdminStack) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(admin.url + "/admin/v1/openapi.json") as resp:
        document = await resp.json()
    ops = {op["operationId"]: op for _, _, op in _operations(document)}
    assert document["openapi"] == "3.1.0"
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert ops["create_key"]["x-switchyard-roles"] == ["tenant_admin", "platform_admin"]
    assert ops["set_price"]["x-switchyard-roles"] == ["platform_admin"]
    assert ops["get_tenant"]["x-switchyard-tenant-scoped"] is True
    assert ops["health"]["security"] == [] and ops["list_keys"]["security"] == [{"bearer": []}]
    body_ref = ops["create_tenant"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_ref == {"$ref": "#/components/schemas/TenantCreate"}
    assert "cache_salt" not in document["components"]["schemas"]["TenantView"]["properties"]
    assert "digest" not in document["components"]["schemas"]["KeyView"]["properties"]
