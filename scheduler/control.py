"""The control plane's records: tenants and API keys, who may act on them,
and how they lie in Redis hashes (one field per attribute, so the quota
actors read `limits` and the ingress reads `status` without the rest).

A tenant's `cache_salt` isolates its prompts in the replicas' prefix caches:
the ingress sets it on every upstream request and strips any salt a client
sends, so no tenant can time another's cached prefixes. It is generated at
creation and never chosen by a client.
"""

from __future__ import annotations

import secrets
from typing import Literal

import msgspec

from scheduler.priority import DEFAULT_PRIORITY, PriorityRange
from scheduler.tenancy import NO_LIMITS, TenantLimits, TenantStatus

Role = Literal["user", "viewer", "tenant_admin", "platform_admin"]
KeyStatus = Literal["active", "revoked"]
ROLES: tuple[Role, ...] = ("user", "viewer", "tenant_admin", "platform_admin")
# Platform admin keys belong to this pseudo-tenant: it has no record, no
# models and nothing to bill, so its keys cannot call inference.
PLATFORM_TENANT = "platform"
CACHE_SALT_BYTES = 16


def new_cache_salt() -> str:
    return secrets.token_hex(CACHE_SALT_BYTES)


class TenantRecord(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    name: str
    status: TenantStatus = "active"
    limits: TenantLimits = NO_LIMITS
    # The models its keys may call; empty: every model.
    models: tuple[str, ...] = ()
    priority: PriorityRange = DEFAULT_PRIORITY
    # Empty only for tenants stored before salts existed.
    cache_salt: str = ""
    created_at_s: int = 0
    # The control store's global version after this record's last change.
    version: int = 0

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    tenant_id: str
    # HMAC of key id and secret under the server secret (scheduler/apikeys.py).
    digest: str
    # The plaintext's last 4 characters, to tell keys apart in listings.
    hint: str
    name: str = ""
    role: Role = "user"
    status: KeyStatus = "active"
    created_at_s: int = 0
    # Unix seconds after which the key stops working; 0: never. Rotation sets
    # it on the old key to the end of its grace period.
    expires_at_s: int = 0
    # The key that replaced this one, or "".
    rotated_to: str = ""
    version: int = 0

    def usable_at(self, now_s: float) -> bool:
        return self.status == "active" and not (self.expires_at_s and now_s >= self.expires_at_s)


class Actor(msgspec.Struct, frozen=True, kw_only=True):
    """Who performs a control-plane operation: an admin key, or the system
    itself (`switchyard up`, bootstrap commands)."""
    key_id: str
    tenant_id: str
    role: Role


SYSTEM = Actor(key_id="system", tenant_id=PLATFORM_TENANT, role="platform_admin")


# --- Redis hash layout ----------------------------------------------------------------

PRIORITY_FIELDS = ("priority_default", "priority_lowest", "priority_highest")
_json = msgspec.json.Encoder()
_limits_decoder = msgspec.json.Decoder(TenantLimits)
_models_decoder = msgspec.json.Decoder(tuple[str, ...])


def tenant_to_fields(tenant: TenantRecord) -> dict[str, str]:
    priority = tenant.priority
    return {
        "name": tenant.name, "status": tenant.status,
        "limits": _json.encode(tenant.limits).decode(),
        "models": _json.encode(tenant.models).decode(),
        **dict(zip(PRIORITY_FIELDS, map(str, (priority.default, priority.lowest,
                                                priority.highest)), strict=True)),
        "cache_salt": tenant.cache_salt, "created_at_s": str(tenant.created_at_s),
        "version": str(tenant.version),
    }


def tenant_from_fields(tenant_id: str, fields: dict[str, str]) -> TenantRecord:
    """Fields a tenant was stored without get their defaults (no limits,
    every model, the default priority range)."""
    stored = [fields.get(name) for name in PRIORITY_FIELDS]
    priority = DEFAULT_PRIORITY if None in stored else PriorityRange(
        **dict(zip(("default", "lowest", "highest"), map(int, stored), strict=True)))
    return TenantRecord(
        tenant_id=tenant_id, name=fields.get("name", ""),
        status="suspended" if fields.get("status") == "suspended" else "active",
        limits=_limits_decoder.decode(fields["limits"]) if fields.get("limits") else NO_LIMITS,
        models=_models_decoder.decode(fields["models"]) if fields.get("models") else (),
        priority=priority, cache_salt=fields.get("cache_salt", ""),
        created_at_s=int(fields.get("created_at_s", 0)), version=int(fields.get("version", 0)))


_KEY_INT_FIELDS = ("created_at_s", "expires_at_s", "version")


def key_to_fields(key: KeyRecord) -> dict[str, str]:
    return {name: str(value) for name, value in msgspec.structs.asdict(key).items()
            if name != "key_id"}


def key_from_fields(key_id: str, fields: dict[str, str]) -> KeyRecord:
    values: dict[str, object] = {name: fields[name] for name in (
        "tenant_id", "digest", "hint", "name", "role", "status", "rotated_to") if name in fields}
    values.update({name: int(fields[name]) for name in _KEY_INT_FIELDS if name in fields})
    return msgspec.convert({"key_id": key_id, **values}, KeyRecord)


# --- views without secrets --------------------------------------------------------------


def public_tenant(tenant: TenantRecord) -> dict[str, object]:
    """What admin reads and audit entries show: the salt is left out."""
    view = msgspec.to_builtins(tenant)
    del view["cache_salt"]
    return view


def public_key(key: KeyRecord) -> dict[str, object]:
    """Hint only: the digest is left out."""
    view = msgspec.to_builtins(key)
    del view["digest"]
    return view
