"""Which tenant an audit entry concerns, for tenant admins who may read only
their own tenant's entries. Entries carry no tenant field: a tenant's own
entries name it as their target; a key's entries show the key's view (with
its tenant) in `before` or `after`; price entries concern no tenant.
"""

from __future__ import annotations

import msgspec

from scheduler.audit import AuditEntry


def entry_tenant(entry: AuditEntry) -> str | None:
    """The tenant id `entry` is about, or None (prices, or an entry this
    version cannot read: shown to platform admins only)."""
    kind = entry.action.partition(".")[0]
    if kind == "tenant":
        return entry.target
    if kind != "key":
        return None
    # A rotation's `after` holds both keys; its `before` is the old key.
    for view in (entry.before, entry.after):
        if not view:
            continue
        try:
            decoded = msgspec.json.decode(view)
        except msgspec.DecodeError:
            return None
        if isinstance(decoded, dict):
            key = decoded.get("key", decoded)
            tenant_id = key.get("tenant_id") if isinstance(key, dict) else None
            return tenant_id if isinstance(tenant_id, str) else None
    return None
