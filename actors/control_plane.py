"""The control plane: tenants, API keys and prices in Redis, changed only
through audited commits (actors/control_tx.py), each followed by a
ControlChanged broadcast. These are the operations the admin API and the
`switchyard` CLI call: each takes the acting key (`Actor`, checked against
scheduler/access.py) and the request id the audit entry carries.

Layout: tenant hash `sy:tenant:{id}` (scheduler/control.py's fields; the
quota actors read `limits`), `sy:tenants` (ids), `sy:tenant-by-name` (name
-> id), key hash `sy:apikey:{key id}`, `sy:tenant-keys:{id}` (its key ids),
`sy:prices` (model -> JSON array of Price). Plaintext keys never reach
Redis: only the HMAC digest and a 4-character hint.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from actors.control_tx import AuditedCommitter, Change, Publish
from scheduler import apikeys
from scheduler.access import Action, authorize, check_grant
from scheduler.config import AuthConfig
from scheduler.control import (
    PLATFORM_TENANT,
    SYSTEM,
    Actor,
    KeyRecord,
    Role,
    TenantRecord,
    key_from_fields,
    key_to_fields,
    new_cache_salt,
    public_key,
    public_tenant,
    tenant_from_fields,
    tenant_to_fields,
)
from scheduler.errors import Conflict, InvalidRequest, RecordNotFound
from scheduler.priority import DEFAULT_PRIORITY, PriorityRange
from scheduler.tenancy import NO_LIMITS, Price, TenantLimits

TENANT_KEY = "sy:tenant:{tenant_id}"
TENANTS_KEY = "sy:tenants"
TENANT_BY_NAME_KEY = "sy:tenant-by-name"
TENANT_KEYS_KEY = "sy:tenant-keys:{tenant_id}"
API_KEY_KEY = "sy:apikey:{key_id}"
PRICES_KEY = "sy:prices"

_prices_decoder = msgspec.json.Decoder(tuple[Price, ...])
_json = msgspec.json.Encoder()


def _view(record: TenantRecord | KeyRecord | None) -> str:
    if record is None:
        return ""
    view = public_tenant(record) if isinstance(record, TenantRecord) else public_key(record)
    return _json.encode(view).decode()


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just issued: the plaintext is here once and stored nowhere."""
    plaintext: str
    record: KeyRecord


class ControlPlane:
    def __init__(self, redis: aioredis.Redis, auth: AuthConfig, publish: Publish | None,
                 clock_s: Callable[[], float] = time.time) -> None:
        """`publish`: the ControlChanged broadcast (control_tx.nats_publisher);
        None only for tools without NATS, whose changes then reach each
        ingress within its key cache TTL."""
        self.redis = redis
        self._secret = auth.key_secret.encode()
        self._grace_s = auth.rotation_grace_s
        self._tx = AuditedCommitter(redis, publish, clock_s)

    # --- reads the ingress makes ------------------------------------------------------

    async def tenant(self, tenant_id: str) -> TenantRecord | None:
        fields = await self.redis.hgetall(TENANT_KEY.format(tenant_id=tenant_id))
        return tenant_from_fields(tenant_id, fields) if fields else None

    async def key(self, key_id: str) -> KeyRecord | None:
        fields = await self.redis.hgetall(API_KEY_KEY.format(key_id=key_id))
        return key_from_fields(key_id, fields) if fields else None

    async def credentials(self, key_id: str) -> tuple[KeyRecord, TenantRecord | None] | None:
        """A key with its tenant (None for platform keys, or a tenant gone)."""
        key = await self.key(key_id)
        if key is None:
            return None
        tenant = None if key.tenant_id == PLATFORM_TENANT else await self.tenant(key.tenant_id)
        return key, tenant

    # --- tenants ------------------------------------------------------------------------

    async def create_tenant(self, actor: Actor, request_id: str, name: str, *,
                            limits: TenantLimits = NO_LIMITS, models: tuple[str, ...] = (),
                            priority: PriorityRange = DEFAULT_PRIORITY) -> TenantRecord:
        authorize(actor, "tenant.create")
        if not name or name == PLATFORM_TENANT:
            raise InvalidRequest("A tenant needs a name (and not `platform`).", param="name")
        tenant_id = "t-" + secrets.token_hex(6)

        async def plan(pipe: Pipeline, version: int, now_s: float) -> Change[TenantRecord]:
            if await pipe.hexists(TENANT_BY_NAME_KEY, name):
                raise Conflict(f"A tenant named `{name}` exists.", param="name")
            tenant = TenantRecord(tenant_id=tenant_id, name=name, limits=limits,
                                  models=tuple(models), priority=priority,
                                  cache_salt=new_cache_salt(), created_at_s=int(now_s),
                                  version=version)

            def write(tx: Pipeline) -> None:
                tx.hset(TENANT_KEY.format(tenant_id=tenant_id), mapping=tenant_to_fields(tenant))
                tx.hset(TENANT_BY_NAME_KEY, name, tenant_id)
                tx.sadd(TENANTS_KEY, tenant_id)
            return Change("tenant", tenant_id, "tenant.create", "", _view(tenant), write, tenant)

        return await self._tx.commit(actor, request_id, (TENANT_BY_NAME_KEY,), plan,
                                     self._never_unchanged)

    async def ensure_tenant(self, actor: Actor, request_id: str, name: str, *,
                            priority: PriorityRange = DEFAULT_PRIORITY) -> TenantRecord:
        """The tenant called `name`, created if there is none (an existing one
        is left as it is)."""
        authorize(actor, "tenant.create")
        tenant_id = await self.redis.hget(TENANT_BY_NAME_KEY, name)
        existing = await self.tenant(tenant_id) if tenant_id else None
        if existing is not None:
            return existing
        try:
            return await self.create_tenant(actor, request_id, name, priority=priority)
        except Conflict:
            # Created meanwhile by someone else.
            tenant_id = await self.redis.hget(TENANT_BY_NAME_KEY, name)
            existing = await self.tenant(tenant_id) if tenant_id else None
            if existing is None:
                raise
            return existing

    async def update_tenant(self, actor: Actor, request_id: str, tenant_id: str, *,
                            limits: TenantLimits | None = None,
                            models: tuple[str, ...] | None = None,
                            priority: PriorityRange | None = None) -> TenantRecord:
        """Changes what is given; None leaves it."""
        changes: dict[str, object] = {name: value for name, value in (
            ("limits", limits), ("models", None if models is None else tuple(models)),
            ("priority", priority)) if value is not None}
        return await self._change_tenant(actor, request_id, tenant_id, "tenant.update", changes)

    async def suspend_tenant(self, actor: Actor, request_id: str,
                             tenant_id: str) -> TenantRecord:
        """Its keys stop working at every ingress (403) within a second."""
        return await self._change_tenant(actor, request_id, tenant_id, "tenant.suspend",
                                         {"status": "suspended"})

    async def resume_tenant(self, actor: Actor, request_id: str, tenant_id: str) -> TenantRecord:
        return await self._change_tenant(actor, request_id, tenant_id, "tenant.resume",
                                         {"status": "active"})

    async def get_tenant(self, actor: Actor, tenant_id: str) -> TenantRecord:
        authorize(actor, "tenant.read", tenant_id)
        tenant = await self.tenant(tenant_id)
        if tenant is None:
            raise RecordNotFound("No such tenant.")
        return tenant

    async def list_tenants(self, actor: Actor) -> list[TenantRecord]:
        authorize(actor, "tenant.list")
        ids = sorted(await self.redis.smembers(TENANTS_KEY))
        found = [await self.tenant(tenant_id) for tenant_id in ids]
        return [tenant for tenant in found if tenant is not None]

    async def _change_tenant(self, actor: Actor, request_id: str, tenant_id: str,
                             action: Action, changes: dict[str, object]) -> TenantRecord:
        authorize(actor, action, tenant_id)
        key = TENANT_KEY.format(tenant_id=tenant_id)

        async def plan(pipe: Pipeline, version: int,
                       now_s: float) -> Change[TenantRecord] | None:
            fields = await pipe.hgetall(key)
            if not fields:
                raise RecordNotFound("No such tenant.")
            before = tenant_from_fields(tenant_id, fields)
            after = msgspec.structs.replace(before, **changes)
            if after == before:
                return None
            after = msgspec.structs.replace(after, version=version)
            return Change("tenant", tenant_id, action, _view(before), _view(after),
                          lambda tx: tx.hset(key, mapping=tenant_to_fields(after)), after)

        async def unchanged() -> TenantRecord:
            return await self.get_tenant(actor, tenant_id)

        return await self._tx.commit(actor, request_id, (key,), plan, unchanged)

    # --- keys ---------------------------------------------------------------------------

    async def create_key(self, actor: Actor, request_id: str, tenant_id: str, *,
                         name: str = "", role: Role = "user", expires_at_s: int = 0) -> NewKey:
        authorize(actor, "key.create", tenant_id)
        check_grant(actor, role, tenant_id)
        return await self._issue(actor, request_id, "key.create", tenant_id, name, role,
                                 expires_at_s, rotating=None)

    async def bootstrap_platform_key(self, request_id: str, name: str = "bootstrap") -> NewKey:
        """A platform admin key, issued by the system itself: how the first
        admin key comes to be (`switchyard up` prints it once)."""
        return await self.create_key(SYSTEM, request_id, PLATFORM_TENANT, name=name,
                                     role="platform_admin")

    async def rotate_key(self, actor: Actor, request_id: str, key_id: str, *,
                         grace_s: float | None = None) -> NewKey:
        """A new key with the same tenant, role and name; the old one keeps
        working for `grace_s` (auth.rotation_grace_s) more seconds, then stops."""
        old = await self.get_key(actor, key_id)
        authorize(actor, "key.rotate", old.tenant_id)
        return await self._issue(actor, request_id, "key.rotate", old.tenant_id, old.name,
                                 old.role, 0, rotating=(key_id, self._grace_s
                                                        if grace_s is None else grace_s))

    async def revoke_key(self, actor: Actor, request_id: str, key_id: str) -> KeyRecord:
        """Stops the key at once (every ingress within a second)."""
        current = await self.get_key(actor, key_id)
        authorize(actor, "key.revoke", current.tenant_id)
        redis_key = API_KEY_KEY.format(key_id=key_id)

        async def plan(pipe: Pipeline, version: int, now_s: float) -> Change[KeyRecord] | None:
            before = key_from_fields(key_id, await pipe.hgetall(redis_key))
            if before.status == "revoked":
                return None
            after = msgspec.structs.replace(before, status="revoked", version=version)
            return Change("key", key_id, "key.revoke", _view(before), _view(after),
                          lambda tx: tx.hset(redis_key, mapping=key_to_fields(after)), after)

        async def unchanged() -> KeyRecord:
            return await self.get_key(actor, key_id)

        return await self._tx.commit(actor, request_id, (redis_key,), plan, unchanged)

    async def get_key(self, actor: Actor, key_id: str) -> KeyRecord:
        key = await self.key(key_id)
        if key is None:
            raise RecordNotFound("No such key.")
        authorize(actor, "key.read", key.tenant_id)
        return key

    async def list_keys(self, actor: Actor, tenant_id: str) -> list[KeyRecord]:
        """Records with hints only: no plaintext exists to list."""
        authorize(actor, "key.read", tenant_id)
        ids = sorted(await self.redis.smembers(TENANT_KEYS_KEY.format(tenant_id=tenant_id)))
        found = [await self.key(key_id) for key_id in ids]
        return [key for key in found if key is not None]

    async def _issue(self, actor: Actor, request_id: str, action: str, tenant_id: str,
                     name: str, role: Role, expires_at_s: int,
                     rotating: tuple[str, float] | None) -> NewKey:
        issued = apikeys.issue(self._secret)
        tenant_key = TENANT_KEY.format(tenant_id=tenant_id)
        old_key = API_KEY_KEY.format(key_id=rotating[0]) if rotating else ""

        async def plan(pipe: Pipeline, version: int, now_s: float) -> Change[NewKey]:
            if tenant_id != PLATFORM_TENANT and not await pipe.exists(tenant_key):
                raise RecordNotFound("No such tenant.")
            record = KeyRecord(key_id=issued.key_id, tenant_id=tenant_id, digest=issued.digest,
                               hint=issued.hint, name=name, role=role,
                               created_at_s=int(now_s), expires_at_s=expires_at_s,
                               version=version)
            before = old = None
            if rotating:
                before = key_from_fields(rotating[0], await pipe.hgetall(old_key))
                if not before.usable_at(now_s) or before.rotated_to:
                    raise Conflict("Only an active key that was not rotated yet can be rotated.")
                grace_end_s = math.ceil(now_s + rotating[1])
                old = msgspec.structs.replace(
                    before, rotated_to=issued.key_id, version=version,
                    expires_at_s=min(before.expires_at_s or grace_end_s, grace_end_s))

            def write(tx: Pipeline) -> None:
                tx.hset(API_KEY_KEY.format(key_id=record.key_id), mapping=key_to_fields(record))
                tx.sadd(TENANT_KEYS_KEY.format(tenant_id=tenant_id), record.key_id)
                if old is not None:
                    tx.hset(old_key, mapping=key_to_fields(old))
            # A rotation is audited on the old key (before/after show the grace
            # end and its successor); the new key is in `after` through rotated_to.
            target = rotating[0] if rotating else record.key_id
            after = _json.encode({"key": public_key(old), "new_key": public_key(record)}
                                 ).decode() if old else _view(record)
            return Change("key", target, action, _view(before), after, write,
                          NewKey(issued.plaintext, record))

        watch = (tenant_key, old_key) if old_key else (tenant_key,)
        return await self._tx.commit(actor, request_id, watch, plan, self._never_unchanged)

    # --- prices -------------------------------------------------------------------------

    async def set_price(self, actor: Actor, request_id: str, model: str,
                        price: Price) -> tuple[Price, ...]:
        """Adds `model`'s price from `price.effective_from_s` on (replacing one
        with the same date). A date in the past is refused: what was already
        metered keeps the price it was metered at."""
        authorize(actor, "price.set")

        async def plan(pipe: Pipeline, version: int, now_s: float) -> Change[tuple[Price, ...]]:
            if price.effective_from_s < int(now_s):
                raise InvalidRequest("A price takes effect now or later, not in the past.",
                                     param="effective_from_s")
            raw = await pipe.hget(PRICES_KEY, model)
            before = _prices_decoder.decode(raw) if raw else ()
            after = tuple(sorted((*(p for p in before
                                    if p.effective_from_s != price.effective_from_s), price),
                                 key=lambda p: p.effective_from_s))
            encoded = _json.encode(after).decode()
            return Change("price", model, "price.set", raw or "", encoded,
                          lambda tx: tx.hset(PRICES_KEY, model, encoded), after)

        return await self._tx.commit(actor, request_id, (PRICES_KEY,), plan,
                                     self._never_unchanged)

    async def prices(self, actor: Actor) -> dict[str, tuple[Price, ...]]:
        authorize(actor, "price.read")
        raw = await self.redis.hgetall(PRICES_KEY)
        return {model: _prices_decoder.decode(value) for model, value in sorted(raw.items())}

    @staticmethod
    async def _never_unchanged() -> object:
        raise AssertionError("this change always writes")


async def tenant_with_key(plane: ControlPlane, name: str,
                          priority: PriorityRange = DEFAULT_PRIORITY
                          ) -> tuple[TenantRecord, NewKey]:
    """The system's own bootstrap (`switchyard up`'s demo tenant, test
    stacks): the tenant called `name`, created if needed, with a new user key."""
    request_id = "sys-" + secrets.token_hex(8)
    tenant = await plane.ensure_tenant(SYSTEM, request_id, name, priority=priority)
    return tenant, await plane.create_key(SYSTEM, request_id, tenant.tenant_id)
