"""Bearer-key authentication: checksum first (no store lookup for a typo),
then an in-process cache with a short TTL in front of Redis."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions

from actors.control_store import KeyRecord, TenantStore
from scheduler import apikeys
from scheduler.errors import AuthenticationFailed, ServiceUnavailable
from scheduler.priority import PriorityRange

MAX_CACHED_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    key_id: str
    # The tenant's default placement priority and what `x-priority` may choose.
    priority: PriorityRange


class Authenticator:
    def __init__(self, store: TenantStore, cache_ttl_s: float,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._ttl_s = cache_ttl_s
        self._clock_s = clock_s
        # key id -> (record or None for "no such key", expires at)
        self._cache: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("Expected `Authorization: Bearer <key>`.")
        parsed = apikeys.parse(token.strip())
        record = await self._record(parsed.key_id)
        if (record is None or record.status != "active"
                or not apikeys.matches(self._store.server_secret, parsed, record.digest)):
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(tenant_id=record.tenant_id, key_id=record.key_id,
                         priority=record.priority)

    async def _record(self, key_id: str) -> KeyRecord | None:
        now_s = self._clock_s()
        hit = self._cache.get(key_id)
        if hit is not None and hit[1] > now_s:
            return hit[0]
        try:
            record = await self._store.key_record(key_id)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ServiceUnavailable(f"key store unreachable: {type(exc).__name__}",
                                     retry_after_s=1.0) from None
        self._cache[key_id] = (record, now_s + self._ttl_s)
        self._cache.move_to_end(key_id)
        while len(self._cache) > MAX_CACHED_KEYS:
            self._cache.popitem(last=False)
        return record
