"""The control plane's pure parts: records and their Redis fields, who may
do what, the audit hash chain, and what the ingress refuses before any
lookup (keys in URLs, upstream URL fields) or rewrites (the cache salt)."""

from __future__ import annotations

import msgspec
import pytest

from router.auth import refuse_query_credentials
from router.requests import parse_request
from scheduler import apikeys
from scheduler.access import authorize, check_grant
from scheduler.audit import GENESIS_HASH, AuditEntry, entry_hash, sealed, verify_chain
from scheduler.audit import from_fields as audit_from_fields
from scheduler.audit import to_fields as audit_to_fields
from scheduler.control import (
    PLATFORM_TENANT,
    PRIORITY_FIELDS,
    Actor,
    KeyRecord,
    TenantRecord,
    key_from_fields,
    key_to_fields,
    new_cache_salt,
    public_key,
    public_tenant,
    tenant_from_fields,
    tenant_to_fields,
)
from scheduler.errors import AuthenticationFailed, InvalidRequest, PermissionDenied, RecordNotFound
from scheduler.priority import DEFAULT_PRIORITY, PriorityRange
from scheduler.tenancy import NO_LIMITS, TenantLimits
from scheduler.wire import ControlChanged, control_changed_decoder, encode

TENANT = TenantRecord(tenant_id="t-1", name="acme", status="suspended",
                      limits=TenantLimits(requests_per_minute=60, budget_nusd=10**9),
                      models=("m1", "org/m2"), priority=PriorityRange(default=1, highest=2),
                      cache_salt=new_cache_salt(), created_at_s=1_700_000_000, version=7)
KEY = KeyRecord(key_id="abcdefghijkl", tenant_id="t-1", digest="d" * 64, hint="wxyz",
                name="ci", role="tenant_admin", status="revoked", created_at_s=5,
                expires_at_s=99, rotated_to="mnopqrstuvwx", version=9)


def test_records_round_trip_through_their_redis_fields() -> None:
    fields = tenant_to_fields(TENANT)
    assert all(isinstance(v, str) for v in fields.values())
    assert tenant_from_fields("t-1", fields) == TENANT
    # The quota actors read `limits` as TenantLimits JSON (the shared layout).
    assert msgspec.json.decode(fields["limits"], type=TenantLimits) == TENANT.limits
    assert key_from_fields(KEY.key_id, key_to_fields(KEY)) == KEY
    assert len(TENANT.cache_salt) == 32 and int(TENANT.cache_salt, 16) >= 0


def test_records_stored_before_these_fields_get_the_defaults() -> None:
    legacy = tenant_from_fields("t-2", {"name": "old", "status": "active",
                                        "created_at_s": "3"})
    assert (legacy.limits, legacy.models, legacy.priority, legacy.cache_salt) == (
        NO_LIMITS, (), DEFAULT_PRIORITY, "")
    assert legacy.allows_model("anything")
    partial = {**tenant_to_fields(TENANT)}
    del partial[PRIORITY_FIELDS[1]]
    assert tenant_from_fields("t-1", partial).priority == DEFAULT_PRIORITY
    old_key = key_from_fields("k", {"tenant_id": "t-2", "digest": "x", "hint": "h",
                                    "status": "active", "created_at_s": "3"})
    assert (old_key.role, old_key.expires_at_s, old_key.rotated_to) == ("user", 0, "")


def test_public_views_hold_no_digest_and_no_salt() -> None:
    assert "digest" not in public_key(KEY) and public_key(KEY)["hint"] == "wxyz"
    assert "cache_salt" not in public_tenant(TENANT)
    assert TENANT.cache_salt not in msgspec.json.encode(public_tenant(TENANT)).decode()


@pytest.mark.parametrize(("status", "expires_at_s", "now_s", "usable"), [
    ("active", 0, 1e12, True),
    ("active", 100, 99.9, True),
    ("active", 100, 100.0, False),
    ("revoked", 0, 0.0, False),
    ("revoked", 100, 50.0, False),
])
def test_a_key_is_usable_while_active_and_before_its_expiry(
        status: str, expires_at_s: int, now_s: float, usable: bool) -> None:
    key = msgspec.structs.replace(KEY, status=status, expires_at_s=expires_at_s)
    assert key.usable_at(now_s) is usable


A_USER = Actor(key_id="u", tenant_id="t-a", role="user")
A_VIEWER = Actor(key_id="v", tenant_id="t-a", role="viewer")
A_ADMIN = Actor(key_id="a", tenant_id="t-a", role="tenant_admin")
PLATFORM = Actor(key_id="p", tenant_id=PLATFORM_TENANT, role="platform_admin")


@pytest.mark.parametrize(("actor", "action", "tenant_id", "outcome"), [
    (PLATFORM, "tenant.create", None, None),
    (PLATFORM, "key.revoke", "t-b", None),
    (PLATFORM, "price.set", None, None),
    (A_ADMIN, "tenant.create", None, PermissionDenied),
    (A_ADMIN, "tenant.suspend", "t-a", PermissionDenied),
    (A_ADMIN, "price.set", None, PermissionDenied),
    (A_ADMIN, "key.create", "t-a", None),
    (A_ADMIN, "key.rotate", "t-a", None),
    (A_ADMIN, "key.create", "t-b", RecordNotFound),
    (A_ADMIN, "tenant.read", "t-b", RecordNotFound),
    (A_ADMIN, "tenant.list", None, PermissionDenied),
    (A_VIEWER, "tenant.read", "t-a", None),
    (A_VIEWER, "key.read", "t-a", None),
    (A_VIEWER, "key.read", "t-b", RecordNotFound),
    (A_VIEWER, "key.revoke", "t-a", PermissionDenied),
    (A_VIEWER, "audit.read", None, PermissionDenied),
    (A_USER, "key.read", "t-a", PermissionDenied),
    (A_USER, "tenant.read", "t-a", PermissionDenied),
])
def test_authorization_denies_by_default(actor: Actor, action: str, tenant_id: str | None,
                                         outcome: type[Exception] | None) -> None:
    if outcome is None:
        authorize(actor, action, tenant_id)  # type: ignore[arg-type]
    else:
        with pytest.raises(outcome):
            authorize(actor, action, tenant_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(("actor", "role", "tenant_id", "allowed"), [
    (A_ADMIN, "user", "t-a", True),
    (A_ADMIN, "tenant_admin", "t-a", True),
    (A_ADMIN, "platform_admin", PLATFORM_TENANT, False),
    (A_VIEWER, "user", "t-a", False),
    (PLATFORM, "platform_admin", PLATFORM_TENANT, True),
    (PLATFORM, "platform_admin", "t-a", False),
    (PLATFORM, "user", PLATFORM_TENANT, False),
])
def test_a_key_grants_no_role_above_its_own(actor: Actor, role: str, tenant_id: str,
                                            allowed: bool) -> None:
    if allowed:
        check_grant(actor, role, tenant_id)  # type: ignore[arg-type]
    else:
        with pytest.raises(PermissionDenied):
            check_grant(actor, role, tenant_id)  # type: ignore[arg-type]


def _chain(length: int) -> list[AuditEntry]:
    entries, prev = [], GENESIS_HASH
    for i in range(length):
        entry = sealed(AuditEntry(version=i + 1, actor="system", action="key.create",
                                  target=f"k{i}", before="", after=f'{{"n":{i}}}',
                                  request_id=f"r{i}", at_ms=i, prev_hash=prev))
        entries.append(entry)
        prev = entry.hash
    return entries


def test_the_audit_chain_verifies_and_survives_its_redis_fields() -> None:
    entries = [audit_from_fields(audit_to_fields(e)) for e in _chain(5)]
    assert verify_chain(entries, entries[-1].hash).ok
    assert verify_chain([], GENESIS_HASH).ok


@pytest.mark.parametrize(("tamper", "first_bad"), [
    # An altered field, even with its own hash recomputed, breaks the next link.
    (lambda es: [*es[:2], msgspec.structs.replace(es[2], after='{"n":99}'), *es[3:]], 2),
    (lambda es: [*es[:2], sealed(msgspec.structs.replace(es[2], actor="mallory")), *es[3:]],
     3),
    (lambda es: [*es[:1], *es[2:]], 1),  # an entry removed
    (lambda es: [es[1], es[0], *es[2:]], 0),  # reordered
    (lambda es: es[:4], 4),  # the tail cut off: the head no longer matches
])
def test_a_tampered_chain_fails_where_it_was_changed(tamper, first_bad: int) -> None:
    entries = _chain(5)
    check = verify_chain(tamper(entries), entries[-1].hash)
    assert not check.ok and check.first_bad == first_bad
    assert entry_hash(entries[0]) == entries[0].hash


def test_control_changed_round_trips() -> None:
    changed = ControlChanged(kind="tenant", id="t-1", version=12)
    assert control_changed_decoder.decode(encode(changed)) == changed
    assert msgspec.json.decode(encode(changed)) == {"kind": "tenant", "id": "t-1",
                                                    "version": 12}


KEY_TEXT = apikeys.issue(b"s").plaintext


@pytest.mark.parametrize(("query", "refused"), [
    ({}, False),
    ({"user": "alice", "page": "2"}, False),
    ({"api_key": "anything"}, True),
    ({"Key": "x"}, True),
    ({"token": ""}, True),
    ({"access_token": "x"}, True),
    ({"q": KEY_TEXT}, True),
    ({"q": "prefix " + KEY_TEXT.upper()}, True),
    ({"q": "sy-short-key"}, False),
])
def test_keys_in_the_query_string_are_refused(query: dict[str, str], refused: bool) -> None:
    if refused:
        with pytest.raises(AuthenticationFailed):
            refuse_query_credentials(query)
    else:
        refuse_query_credentials(query)


CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]'


@pytest.mark.parametrize(("extra", "salt", "sent_salt"), [
    (b"", "tenant-salt", "tenant-salt"),
    (b',"cache_salt":"mine"', "tenant-salt", "tenant-salt"),
    (b',"cache_salt":"mine"', "", None),
    (b',"cache_salt":null', "", None),
])
def test_the_tenants_salt_replaces_the_clients(extra: bytes, salt: str,
                                               sent_salt: str | None) -> None:
    parsed = parse_request("chat", CHAT + extra + b"}", salt)
    assert msgspec.json.decode(parsed.upstream_body).get("cache_salt") == sent_salt
    assert parsed.cache_salt == salt


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_url", "endpoint"])
def test_a_client_cannot_name_an_upstream(field: str) -> None:
    body = CHAT + b',"' + field.encode() + b'":"http://169.254.169.254/"}'
    with pytest.raises(InvalidRequest) as caught:
        parse_request("chat", body, "salt")
    assert caught.value.param == field
