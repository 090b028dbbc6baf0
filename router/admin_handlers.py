"""What each admin operation does: decode its body and parameters, call the
control plane (actors/control_plane.py) as the calling key with the call's
request id (which the audit entry keeps), and answer with a view. Who may
call what was checked before (router/admin_app.py); the control plane checks
again, so a handler cannot widen it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from actors.audit_log import audit_page
from actors.control_plane import ControlPlane, NewKey
from analytics.metering_client import MeteringClient
from scheduler.admin_api import (
    MAX_AUDIT_PAGE_ENTRIES,
    AuditPage,
    Health,
    IssuedKey,
    KeyCreate,
    KeyList,
    KeyRotate,
    ModelPrices,
    Operation,
    PriceList,
    PriceSet,
    TenantCreate,
    TenantList,
    TenantUpdate,
    key_view,
    tenant_view,
)
from scheduler.control import Actor
from scheduler.errors import InvalidRequest
from scheduler.openapi import openapi_document

DEFAULT_AUDIT_PAGE_ENTRIES = 100
_DOCUMENT = openapi_document()
_ERROR_PATH = re.compile(r"at `\$\.?([^`]*)`")


@dataclass(frozen=True, slots=True)
class Call:
    """One admin call, authenticated and authorized."""
    plane: ControlPlane
    redis: aioredis.Redis
    metering: MeteringClient
    # None for public operations.
    actor: Actor | None
    request_id: str
    path: Mapping[str, str]
    query: Mapping[str, str]
    body: Any

    @property
    def who(self) -> Actor:
        assert self.actor is not None, "only public operations have no actor"
        return self.actor


def decode_body(op: Operation, raw: bytes) -> Any:
    """The operation's body struct; an empty body is `{}` (valid when every
    field has a default). Malformed or invalid input is a 400 naming the field."""
    if op.body is None:
        return None
    try:
        return msgspec.json.decode(raw.strip() or b"{}", type=op.body)
    except msgspec.ValidationError as exc:
        found = _ERROR_PATH.search(str(exc))
        raise InvalidRequest(f"Invalid body: {exc}",
                             param=found.group(1) or None if found else None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}") from None


def _int_param(query: Mapping[str, str], name: str, default: int, lowest: int,
               highest: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an integer.", param=name) from None
    if not lowest <= value <= highest:
        raise InvalidRequest(f"`{name}` must be in [{lowest}, {highest}].", param=name)
    return value


def _issued(new: NewKey) -> IssuedKey:
    return IssuedKey(key=new.plaintext, record=key_view(new.record))


async def health(call: Call) -> Health:
    return Health(status="ok")


async def openapi(call: Call) -> dict[str, Any]:
    return _DOCUMENT


async def list_tenants(call: Call) -> TenantList:
    return TenantList(data=[tenant_view(t) for t in await call.plane.list_tenants(call.who)])


async def create_tenant(call: Call) -> Any:
    body: TenantCreate = call.body
    return tenant_view(await call.plane.create_tenant(
        call.who, call.request_id, body.name, limits=body.limits.limits(),
        models=body.models, priority=body.priority.priority()))


async def get_tenant(call: Call) -> Any:
    return tenant_view(await call.plane.get_tenant(call.who, call.path["tenant_id"]))


async def update_tenant(call: Call) -> Any:
    body: TenantUpdate = call.body
    if body.limits is None and body.models is None and body.priority is None:
        raise InvalidRequest("Nothing to change: give limits, models or priority.")
    return tenant_view(await call.plane.update_tenant(
        call.who, call.request_id, call.path["tenant_id"],
        limits=None if body.limits is None else body.limits.limits(), models=body.models,
        priority=None if body.priority is None else body.priority.priority()))


async def suspend_tenant(call: Call) -> Any:
    return tenant_view(await call.plane.suspend_tenant(call.who, call.request_id,
                                                       call.path["tenant_id"]))


async def resume_tenant(call: Call) -> Any:
    return tenant_view(await call.plane.resume_tenant(call.who, call.request_id,
                                                      call.path["tenant_id"]))


async def list_keys(call: Call) -> KeyList:
    keys = await call.plane.list_keys(call.who, call.path["tenant_id"])
    return KeyList(data=[key_view(k) for k in keys])


async def create_key(call: Call) -> IssuedKey:
    body: KeyCreate = call.body
    if body.expires_at_s and body.expires_at_s <= time.time():
        raise InvalidRequest("A key's expiry must be in the future (or 0: never).",
                             param="expires_at_s")
    return _issued(await call.plane.create_key(
        call.who, call.request_id, call.path["tenant_id"], name=body.name, role=body.role,
        expires_at_s=body.expires_at_s))


async def get_key(call: Call) -> Any:
    return key_view(await call.plane.get_key(call.who, call.path["key_id"]))


async def rotate_key(call: Call) -> IssuedKey:
    body: KeyRotate = call.body
    return _issued(await call.plane.rotate_key(call.who, call.request_id, call.path["key_id"],
                                               grace_s=body.grace_s))


async def revoke_key(call: Call) -> Any:
    return key_view(await call.plane.revoke_key(call.who, call.request_id,
                                                call.path["key_id"]))


async def list_prices(call: Call) -> PriceList:
    prices = await call.plane.prices(call.who)
    return PriceList(data=[ModelPrices(model=model, prices=p) for model, p in prices.items()])


async def set_price(call: Call) -> ModelPrices:
    body: PriceSet = call.body
    model = call.path["model"]
    return ModelPrices(model=model, prices=await call.plane.set_price(
        call.who, call.request_id, model, body.price()))


async def list_audit(call: Call) -> AuditPage:
    actor = call.who
    # Authorization already refused another tenant's id (404); a tenant
    # admin's listing is its own tenant's, asked for or not.
    tenant_id = (call.query.get("tenant_id") if actor.role == "platform_admin"
                 else actor.tenant_id)
    entries, next_after = await audit_page(
        call.redis, tenant_id=tenant_id,
        after_version=_int_param(call.query, "after_version", 0, 0, 2**62),
        limit=_int_param(call.query, "limit", DEFAULT_AUDIT_PAGE_ENTRIES, 1,
                         MAX_AUDIT_PAGE_ENTRIES))
    return AuditPage(data=entries, next_after_version=next_after)


Handler = Callable[[Call], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {
    "health": health, "openapi": openapi, "list_tenants": list_tenants,
    "create_tenant": create_tenant, "get_tenant": get_tenant, "update_tenant": update_tenant,
    "suspend_tenant": suspend_tenant, "resume_tenant": resume_tenant,
    "list_keys": list_keys, "create_key": create_key, "get_key": get_key,
    "rotate_key": rotate_key, "revoke_key": revoke_key, "list_prices": list_prices,
    "set_price": set_price, "list_audit": list_audit,
}
