"""The admin API's pure parts: the operation table (every row served, every
served route a row), the OpenAPI document built from it, the secret-free
views, and which tenant an audit entry concerns."""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from router.admin_handlers import HANDLERS
from router.billing_handlers import BILLING_HANDLERS
from router.dashboard import dashboard_handlers
from scheduler.admin_api import OPERATIONS, PREFIX, key_view, tenant_view
from scheduler.audit import AuditEntry
from scheduler.audit_scope import entry_tenant
from scheduler.control import KeyRecord, TenantRecord, public_key
from scheduler.openapi import openapi_document


def test_every_operation_has_one_handler_and_a_unique_route() -> None:
    dashboard = dashboard_handlers()
    assert not set(HANDLERS) & set(BILLING_HANDLERS) and not set(HANDLERS) & set(dashboard)
    assert sorted({**HANDLERS, **BILLING_HANDLERS, **dashboard}) == sorted(
        op.operation_id for op in OPERATIONS)
    assert len({(op.method, op.path) for op in OPERATIONS}) == len(OPERATIONS)
    assert all(op.path.startswith(PREFIX) for op in OPERATIONS if op.operation_id != "health")


def test_only_health_the_document_and_the_dashboard_page_are_public() -> None:
    assert sorted(op.operation_id for op in OPERATIONS if op.action is None) == [
        "dashboard", "dashboard_asset", "health", "openapi"]


def test_every_reference_in_the_document_resolves() -> None:
    document = openapi_document()
    text = json.dumps(document)
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', text))
    assert refs and refs <= set(schemas)
    for path, methods in document["paths"].items():
        for op in methods.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path))


def test_views_leave_secrets_out_and_refuse_unknown_fields() -> None:
    tenant = TenantRecord(tenant_id="t-1", name="n", cache_salt="salty")
    key = KeyRecord(key_id="k1", tenant_id="t-1", digest="d" * 64, hint="abcd")
    assert "salty" not in msgspec.json.encode(tenant_view(tenant)).decode()
    assert "d" * 64 not in msgspec.json.encode(key_view(key)).decode()
    # A record field the view does not know fails loudly (the view must decide).
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**public_key(key), "new_secret": "x"}, type(key_view(key)))


def _entry(action: str, target: str, before: str = "", after: str = "") -> AuditEntry:
    return AuditEntry(version=1, actor="k", action=action, target=target, before=before,
                      after=after, request_id="r", at_ms=0, prev_hash="0")


@pytest.mark.parametrize(("entry", "tenant"), [
    (_entry("tenant.create", "t-a", after='{"tenant_id":"t-a"}'), "t-a"),
    (_entry("tenant.suspend", "t-a", '{"tenant_id":"t-a"}', '{"tenant_id":"t-a"}'), "t-a"),
    (_entry("key.create", "k1", after='{"key_id":"k1","tenant_id":"t-b"}'), "t-b"),
    (_entry("key.revoke", "k1", '{"tenant_id":"t-b"}', '{"tenant_id":"t-b"}'), "t-b"),
    (_entry("key.rotate", "k1", '{"tenant_id":"t-c"}',
            '{"key":{"tenant_id":"t-c"},"new_key":{"tenant_id":"t-c"}}'), "t-c"),
    (_entry("key.create", "k2", after='{"tenant_id":"platform"}'), "platform"),
    (_entry("price.set", "model-x", after="[]"), None),
    (_entry("key.create", "k3", after="not json"), None),
    (_entry("key.create", "k4", after='{"tenant_id": 5}'), None),
])
def test_entry_tenant(entry: AuditEntry, tenant: str | None) -> None:
    assert entry_tenant(entry) == tenant
