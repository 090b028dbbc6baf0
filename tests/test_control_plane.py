"""The control plane against real Redis (its own database, 13): tenants,
keys and prices; each mutation's audit entry, version and broadcast; roles
enforced by the store itself; the hash chain, and a tampered copy of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio

from actors.control_plane import (
    API_KEY_KEY,
    PRICES_KEY,
    TENANT_KEY,
    ControlPlane,
    NewKey,
    tenant_with_key,
)
from actors.control_store import connect_redis
from actors.control_tx import AUDIT_KEY, audit_entries, verify_audit
from scheduler import apikeys
from scheduler.audit import to_fields
from scheduler.config import AuthConfig, RedisConfig
from scheduler.control import PLATFORM_TENANT, SYSTEM, Actor
from scheduler.errors import Conflict, InvalidRequest, PermissionDenied, RecordNotFound
from scheduler.priority import PriorityRange
from scheduler.tenancy import Price, TenantLimits
from scheduler.wire import ControlChanged

pytestmark = pytest.mark.integration
REDIS_DB = 13
NOW_S = 1_800_000_000.0
AUTH = AuthConfig(key_secret="control-secret", rotation_grace_s=60.0)


class Plane:
    def __init__(self, plane: ControlPlane, heard: list[ControlChanged], clock: list[float]):
        self.plane, self.heard, self.clock = plane, heard, clock


@pytest_asyncio.fixture
async def cp(redis_url: str) -> AsyncIterator[Plane]:
    redis = connect_redis(RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}"))
    await redis.flushdb()
    heard: list[ControlChanged] = []
    clock = [NOW_S]

    async def publish(changed: ControlChanged) -> None:
        heard.append(changed)

    yield Plane(ControlPlane(redis, AUTH, publish, clock_s=lambda: clock[0]), heard, clock)
    await redis.aclose()


async def test_tenant_lifecycle_is_audited_versioned_and_broadcast(cp: Plane) -> None:
    plane = cp.plane
    tenant = await plane.create_tenant(SYSTEM, "r1", "acme", models=("m1",))
    assert tenant.version == 1 and len(tenant.cache_salt) == 32
    with pytest.raises(Conflict):
        await plane.create_tenant(SYSTEM, "r2", "acme")
    limits = TenantLimits(requests_per_minute=100, budget_nusd=5 * 10**9)
    updated = await plane.update_tenant(SYSTEM, "r3", tenant.tenant_id, limits=limits,
                                        priority=PriorityRange(default=0, highest=3))
    assert updated.limits == limits and updated.models == ("m1",) and updated.version == 2
    assert updated.cache_salt == tenant.cache_salt
    suspended = await plane.suspend_tenant(SYSTEM, "r4", tenant.tenant_id)
    assert suspended.status == "suspended"
    # Nothing to change: no write, no entry, no version.
    assert (await plane.suspend_tenant(SYSTEM, "r5", tenant.tenant_id)).version == 3
    assert (await plane.resume_tenant(SYSTEM, "r6", tenant.tenant_id)).status == "active"
    assert [t.tenant_id for t in await plane.list_tenants(SYSTEM)] == [tenant.tenant_id]
    # The layout shared with the quota actors: `limits` is TenantLimits JSON.
    raw = await plane.redis.hget(TENANT_KEY.format(tenant_id=tenant.tenant_id), "limits")
    assert msgspec.json.decode(raw, type=TenantLimits) == limits

    entries = await audit_entries(plane.redis)
    assert [(e.action, e.request_id, e.version) for e in entries] == [
        ("tenant.create", "r1", 1), ("tenant.update", "r3", 2), ("tenant.suspend", "r4", 3),
        ("tenant.resume", "r6", 4)]
    assert entries[0].before == "" and entries[0].actor == "system"
    assert msgspec.json.decode(entries[2].before)["status"] == "active"
    assert msgspec.json.decode(entries[2].after)["status"] == "suspended"
    assert all(tenant.cache_salt not in e.after + e.before for e in entries)
    assert cp.heard == [ControlChanged(kind="tenant", id=tenant.tenant_id, version=v)
                        for v in (1, 2, 3, 4)]
    assert (await verify_audit(plane.redis)).ok


async def test_key_lifecycle_create_rotate_revoke(cp: Plane) -> None:
    plane = cp.plane
    tenant, first = await tenant_with_key(plane, "acme")
    assert first.record.role == "user" and first.record.hint == first.plaintext[-4:]
    stored = await plane.redis.hgetall(API_KEY_KEY.format(key_id=first.record.key_id))
    assert stored["digest"] == first.record.digest and first.plaintext not in str(stored)
    assert apikeys.matches(AUTH.key_secret.encode(), apikeys.parse(first.plaintext),
                           stored["digest"])

    cp.clock[0] = NOW_S + 10.4
    rotated = await plane.rotate_key(SYSTEM, "rot", first.record.key_id, grace_s=5)
    old = await plane.get_key(SYSTEM, first.record.key_id)
    assert old.rotated_to == rotated.record.key_id and old.expires_at_s == NOW_S + 16
    assert old.usable_at(NOW_S + 15.9) and not old.usable_at(NOW_S + 16)
    assert (rotated.record.tenant_id, rotated.record.role, rotated.record.expires_at_s) == (
        tenant.tenant_id, "user", 0)
    with pytest.raises(Conflict):
        await plane.rotate_key(SYSTEM, "rot2", first.record.key_id)
    # The configured grace when none is given.
    again = await plane.rotate_key(SYSTEM, "rot3", rotated.record.key_id)
    assert (await plane.key(rotated.record.key_id)).expires_at_s == NOW_S + 10 + 61

    revoked = await plane.revoke_key(SYSTEM, "rev", again.record.key_id)
    assert revoked.status == "revoked" and not revoked.usable_at(NOW_S)
    assert (await plane.revoke_key(SYSTEM, "rev2", again.record.key_id)).version == (
        revoked.version)
    listed = await plane.list_keys(SYSTEM, tenant.tenant_id)
    assert {k.key_id for k in listed} == {first.record.key_id, rotated.record.key_id,
                                          again.record.key_id}
    entries = await audit_entries(plane.redis)
    actions = [(e.action, e.target) for e in entries]
    assert actions[-4:] == [("key.create", first.record.key_id),
                            ("key.rotate", first.record.key_id),
                            ("key.rotate", rotated.record.key_id),
                            ("key.revoke", again.record.key_id)]
    rotation = msgspec.json.decode(entries[-3].after)
    assert rotation["new_key"]["key_id"] == rotated.record.key_id
    assert all("digest" not in e.after and first.record.digest not in e.after
               for e in entries)
    assert [c.kind for c in cp.heard[-4:]] == ["key"] * 4
    assert (await verify_audit(plane.redis)).ok


async def test_the_store_enforces_roles(cp: Plane) -> None:
    plane = cp.plane
    a, _ = await tenant_with_key(plane, "a")
    b, b_key = await tenant_with_key(plane, "b")
    admin_key = await plane.create_key(SYSTEM, "r", a.tenant_id, role="tenant_admin")
    admin = Actor(key_id=admin_key.record.key_id, tenant_id=a.tenant_id, role="tenant_admin")
    viewer = Actor(key_id="v", tenant_id=a.tenant_id, role="viewer")
    made = await plane.create_key(admin, "r-admin", a.tenant_id, name="ci")
    entry = (await audit_entries(plane.redis))[-1]
    assert (entry.actor, entry.request_id, entry.target) == (
        admin.key_id, "r-admin", made.record.key_id)
    with pytest.raises(RecordNotFound):  # another tenant's key: not found, not forbidden
        await plane.revoke_key(admin, "r", b_key.record.key_id)
    with pytest.raises(RecordNotFound):
        await plane.create_key(admin, "r", b.tenant_id)
    with pytest.raises(PermissionDenied):
        await plane.create_key(admin, "r", a.tenant_id, role="platform_admin")
    with pytest.raises(RecordNotFound):
        await plane.create_key(admin, "r", PLATFORM_TENANT, role="platform_admin")
    with pytest.raises(PermissionDenied):
        await plane.suspend_tenant(admin, "r", a.tenant_id)
    with pytest.raises(PermissionDenied):
        await plane.create_key(viewer, "r", a.tenant_id)
    assert len(await plane.list_keys(viewer, a.tenant_id)) == 3
    with pytest.raises(RecordNotFound):
        await plane.create_key(SYSTEM, "r", "t-nonexistent")
    assert (await plane.key(b_key.record.key_id)).status == "active"

    boot = await plane.bootstrap_platform_key("boot")
    assert (boot.record.role, boot.record.tenant_id) == ("platform_admin", PLATFORM_TENANT)
    assert await plane.credentials(boot.record.key_id) == (boot.record, None)


async def test_prices_by_model_with_effective_dates(cp: Plane) -> None:
    plane = cp.plane
    now = int(NOW_S)
    first = Price(effective_from_s=now, input_nusd_per_token=150,
                  cached_input_nusd_per_token=75, output_nusd_per_token=600)
    later = msgspec.structs.replace(first, effective_from_s=now + 86_400,
                                    output_nusd_per_token=500)
    await plane.set_price(SYSTEM, "p1", "m1", later)
    assert await plane.set_price(SYSTEM, "p2", "m1", first) == (first, later)
    with pytest.raises(InvalidRequest):
        await plane.set_price(SYSTEM, "p3", "m1",
                              msgspec.structs.replace(first, effective_from_s=now - 1))
    assert await plane.prices(SYSTEM) == {"m1": (first, later)}
    raw = await plane.redis.hget(PRICES_KEY, "m1")
    assert msgspec.json.decode(raw, type=tuple[Price, ...]) == (first, later)
    assert cp.heard[-1] == ControlChanged(kind="price", id="m1", version=2)


async def test_concurrent_mutations_each_commit_once_in_one_chain(cp: Plane) -> None:
    plane = cp.plane
    tenant, _ = await tenant_with_key(plane, "busy")
    made: list[NewKey] = await asyncio.gather(*(
        plane.create_key(SYSTEM, f"c{i}", tenant.tenant_id) for i in range(30)))
    versions = sorted(k.record.version for k in made)
    assert versions == list(range(3, 33))
    entries = await audit_entries(plane.redis)
    assert len(entries) == 32 and [e.version for e in entries] == list(range(1, 33))
    assert (await verify_audit(plane.redis)).ok
    assert int(await plane.redis.get("sy:control:version")) == 32


async def test_a_tampered_copy_of_the_log_fails_verification(cp: Plane) -> None:
    plane = cp.plane
    for name in ("a", "b", "c"):
        await tenant_with_key(plane, name)
    entries = await audit_entries(plane.redis)
    head = await plane.redis.get("sy:audit:head")
    copy, copy_head = AUDIT_KEY + ":copy", "sy:audit:copy-head"
    await plane.redis.set(copy_head, head)
    for i, entry in enumerate(entries):
        fields = to_fields(entry)
        if i == 3:
            fields["actor"] = "someone-else"
        await plane.redis.xadd(copy, fields)
    check = await verify_audit(plane.redis, copy, copy_head)
    assert not check.ok and check.first_bad == 3
    assert (await verify_audit(plane.redis)).ok
