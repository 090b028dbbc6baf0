"""Pages of the control plane's audit log (the `sy:audit` stream written by
actors/control_tx.py), optionally only the entries about one tenant.

Entries are in commit order, so versions increase along the stream; a page
starts after a version by reading from the stream's start. That is a scan
of the whole log per page: fine for admin traffic on a log of thousands of
entries; an index by version (or by tenant) is the step when it is not.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from actors.control_tx import AUDIT_KEY, AUDIT_PAGE_ENTRIES
from scheduler.audit import AuditEntry, from_fields
from scheduler.audit_scope import entry_tenant


async def audit_page(redis: aioredis.Redis, *, tenant_id: str | None, after_version: int,
                     limit: int) -> tuple[list[AuditEntry], int]:
    """Up to `limit` entries with a version above `after_version` (about
    `tenant_id` only, unless None), and the version to continue after (0:
    there are no more)."""
    found: list[AuditEntry] = []
    start = "-"
    while True:
        batch = await redis.xrange(AUDIT_KEY, min=start, max="+", count=AUDIT_PAGE_ENTRIES)
        for _, fields in batch:
            entry = from_fields(fields)
            if entry.version <= after_version:
                continue
            if tenant_id is not None and entry_tenant(entry) != tenant_id:
                continue
            if len(found) == limit:
                return found, found[-1].version
            found.append(entry)
        if len(batch) < AUDIT_PAGE_ENTRIES:
            return found, 0
        start = "(" + batch[-1][0]
