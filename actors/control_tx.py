"""One control-store mutation, its audit entry and the version bump in one
atomic step: WATCH the version, the audit head and the records read, plan
the change from what was read, then MULTI/EXEC the record writes, the audit
entry (XADD) and the new head and version. A concurrent mutation makes EXEC
fail and the whole step is planned again, so the log is in commit order and
each entry links to the one committed before it. A writer killed before
EXEC leaves nothing (Redis drops a dead connection's queued commands); after
it, everything.

The ControlChanged broadcast follows the commit and is not part of it:
an ingress that misses it sees the change when its cached copy expires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.errors
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.client import Client as NATS
from redis.asyncio.client import Pipeline

from scheduler.audit import (
    GENESIS_HASH,
    AuditEntry,
    ChainCheck,
    from_fields,
    sealed,
    to_fields,
    verify_chain,
)
from scheduler.control import Actor
from scheduler.errors import Conflict
from scheduler.wire import CONTROL_CHANGED_SUBJECT, ControlChanged, encode

log = logging.getLogger("switchyard.control")

VERSION_KEY = "sy:control:version"
AUDIT_KEY = "sy:audit"
AUDIT_HEAD_KEY = "sy:audit:head"
# Mutations are rare (admin operations); this many lost races in a row means
# something writes without end.
MAX_COMMIT_ATTEMPTS = 50
AUDIT_PAGE_ENTRIES = 1_000

Publish = Callable[[ControlChanged], Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """A planned mutation: what it writes (queued on the MULTI pipeline),
    what the audit entry says, and what the caller gets back."""
    kind: str  # "key" | "tenant" | "price": the ControlChanged kind
    target: str
    action: str
    before: str
    after: str
    write: Callable[[Pipeline], None]
    result: T


# plan(pipe, version, now_s): reads through the watching pipeline and returns
# the change, or None when there is nothing to change (no write, no entry).
Plan = Callable[[Pipeline, int, float], Awaitable["Change[T] | None"]]


def nats_publisher(nc: NATS) -> Publish:
    async def publish(changed: ControlChanged) -> None:
        await nc.publish(CONTROL_CHANGED_SUBJECT, encode(changed))
    return publish


class AuditedCommitter:
    """Runs every mutation of the control store; nothing else writes records."""

    def __init__(self, redis: aioredis.Redis, publish: Publish | None,
                 clock_s: Callable[[], float] = time.time) -> None:
        self.redis = redis
        # None: no broadcast (tools without NATS); ingresses then see the
        # change within their key cache TTL.
        self._publish = publish
        self._clock_s = clock_s

    async def commit(self, actor: Actor, request_id: str, watch: tuple[str, ...],
                     plan: Plan[T], unchanged: Callable[[], Awaitable[T]]) -> T:
        """Commits `plan`'s change with its audit entry; `unchanged()` is the
        answer when the plan finds nothing to change."""
        for _ in range(MAX_COMMIT_ATTEMPTS):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(VERSION_KEY, AUDIT_HEAD_KEY, *watch)
                    version = int(await pipe.get(VERSION_KEY) or 0) + 1
                    head = await pipe.get(AUDIT_HEAD_KEY) or GENESIS_HASH
                    now_s = self._clock_s()
                    change = await plan(pipe, version, now_s)
                    if change is None:
                        await pipe.unwatch()
                        return await unchanged()
                    entry = sealed(AuditEntry(
                        version=version, actor=actor.key_id, action=change.action,
                        target=change.target, before=change.before, after=change.after,
                        request_id=request_id, at_ms=int(now_s * 1000), prev_hash=head))
                    pipe.multi()
                    change.write(pipe)
                    pipe.set(VERSION_KEY, version)
                    pipe.xadd(AUDIT_KEY, to_fields(entry))
                    pipe.set(AUDIT_HEAD_KEY, entry.hash)
                    await pipe.execute()
                except redis.exceptions.WatchError:
                    continue
            await self._announce(ControlChanged(kind=change.kind, id=change.target,
                                                version=version))
            return change.result
        raise Conflict("The control store is too busy to apply this change; retry.",
                       retry_after_s=1.0)

    async def _announce(self, changed: ControlChanged) -> None:
        if self._publish is None:
            return
        try:
            await self._publish(changed)
        except (nats.errors.Error, OSError) as exc:
            # Committed already; the ingress caches' TTL is the backstop.
            log.warning("control change %s %s not broadcast: %s", changed.kind, changed.id,
                        type(exc).__name__)


async def audit_entries(redis: aioredis.Redis, key: str = AUDIT_KEY) -> list[AuditEntry]:
    """The whole log, oldest first, read in pages."""
    entries: list[AuditEntry] = []
    start = "-"
    while True:
        page = await redis.xrange(key, min=start, max="+", count=AUDIT_PAGE_ENTRIES)
        entries.extend(from_fields(fields) for _, fields in page)
        if len(page) < AUDIT_PAGE_ENTRIES:
            return entries
        start = "(" + page[-1][0]


async def verify_audit(redis: aioredis.Redis, key: str = AUDIT_KEY,
                       head_key: str = AUDIT_HEAD_KEY) -> ChainCheck:
    return verify_chain(await audit_entries(redis, key), await redis.get(head_key) or GENESIS_HASH)
