"""Who may do what in the control plane: deny by default.

`user` keys call inference only; `viewer` keys also read their own tenant's
admin data; `tenant_admin` keys also create, rotate and revoke their own
tenant's keys and read its audit entries; `platform_admin` keys (of the
platform pseudo-tenant) do everything, and nothing else may touch tenants or
prices. A key acting on
another tenant's records is told they do not exist (404), never that they
are someone else's (403), so ids cannot be probed.
"""

from __future__ import annotations

from typing import Literal

from scheduler.control import PLATFORM_TENANT, Actor, Role
from scheduler.errors import PermissionDenied, RecordNotFound

Action = Literal[
    "tenant.create", "tenant.update", "tenant.suspend", "tenant.resume", "tenant.list",
    "tenant.read", "key.create", "key.rotate", "key.revoke", "key.read", "price.set",
    "price.read", "audit.read", "usage.read", "billing.read",
]

# action -> the roles that may perform it on their own tenant's records
# (platform admins may perform every action on every tenant).
OWN_TENANT_ROLES: dict[Action, frozenset[Role]] = {
    "tenant.read": frozenset({"viewer", "tenant_admin"}),
    "key.read": frozenset({"viewer", "tenant_admin"}),
    "key.create": frozenset({"tenant_admin"}),
    "key.rotate": frozenset({"tenant_admin"}),
    "key.revoke": frozenset({"tenant_admin"}),
    # What a tenant is billed at is no secret to it.
    "price.read": frozenset({"viewer", "tenant_admin"}),
    # The entries about their own tenant and its keys (the admin API filters).
    "audit.read": frozenset({"tenant_admin"}),
    # Their own tenant's usage and statements (the admin API scopes a query
    # without a tenant to the key's own).
    "usage.read": frozenset({"viewer", "tenant_admin"}),
    "billing.read": frozenset({"viewer", "tenant_admin"}),
}
# The roles a key may grant when it creates another key: never above its own.
GRANTABLE: dict[Role, frozenset[Role]] = {
    "user": frozenset(),
    "viewer": frozenset(),
    "tenant_admin": frozenset({"user", "viewer", "tenant_admin"}),
    "platform_admin": frozenset({"user", "viewer", "tenant_admin", "platform_admin"}),
}


def authorize(actor: Actor, action: Action, tenant_id: str | None = None) -> None:
    """Raises unless `actor` may perform `action` on `tenant_id`'s records
    (None: an action on no tenant's records, like listing tenants)."""
    if actor.role == "platform_admin":
        return
    if actor.role not in OWN_TENANT_ROLES.get(action, frozenset()):
        raise PermissionDenied("This key is not allowed to perform this operation.")
    if tenant_id is not None and tenant_id != actor.tenant_id:
        raise RecordNotFound("No such record.")


def check_grant(actor: Actor, role: Role, tenant_id: str) -> None:
    """A new key's role must be grantable by `actor`, and platform admin keys
    belong to the platform pseudo-tenant, every other key to a real one."""
    if role not in GRANTABLE[actor.role]:
        raise PermissionDenied(f"This key cannot create `{role}` keys.")
    if (role == "platform_admin") != (tenant_id == PLATFORM_TENANT):
        raise PermissionDenied("Platform admin keys belong to the platform, and only they do.")
