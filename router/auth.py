"""Bearer-key authentication: checksum first (no store lookup for a typo),
then an in-process cache with a short TTL in front of Redis.

Every ingress subscribes to ControlChanged and evicts the key (or every
cached key of the tenant) a mutation touched, so a revocation or a
suspension takes effect within a second; the TTL bounds how long a cached
copy lives when that broadcast is lost, and the whole cache goes when the
NATS connection comes back after an outage (a broadcast may have been
missed). Expiry and rotation grace ends are times in the record, checked on
every request, so they need no broadcast.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec
import redis.exceptions
from nats.aio.msg import Msg

from actors.control_plane import ControlPlane
from scheduler import apikeys
from scheduler.control import KeyRecord, Role, TenantRecord
from scheduler.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from scheduler.priority import DEFAULT_PRIORITY, PriorityRange
from scheduler.wire import ControlChanged, control_changed_decoder

log = logging.getLogger("switchyard.auth")
MAX_CACHED_KEYS = 100_000
# Query parameters that look like credentials. A key in a URL ends up in
# access logs, proxies and browser history: such a request is refused and
# the key is never looked up.
CREDENTIAL_PARAMS = frozenset({
    "api_key", "api-key", "apikey", "key", "token", "access_token", "auth", "authorization",
    "bearer", "x-api-key", "secret",
})
_KEY_SHAPED = re.compile(rf"sy-[a-z2-7]{{{apikeys.KEY_ID_CHARS}}}-", re.IGNORECASE)

Credentials = tuple[KeyRecord, TenantRecord | None]


def refuse_query_credentials(query: Mapping[str, str]) -> None:
    """401 when the query string carries anything that may be a key."""
    for name, value in query.items():
        if name.lower() in CREDENTIAL_PARAMS or _KEY_SHAPED.search(value):
            raise AuthenticationFailed(
                "API keys are not accepted in the URL; send `Authorization: Bearer <key>`. "
                "Treat a key that was sent in a URL as leaked and rotate it.")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    key_id: str
    role: Role
    # The tenant's default placement priority and what `x-priority` may choose.
    priority: PriorityRange
    # None for platform admin keys, which have no tenant to bill.
    tenant: TenantRecord | None

    def inference_tenant(self) -> TenantRecord:
        """The tenant an inference request is served and billed for."""
        if self.tenant is None:
            raise PermissionDenied("Platform admin keys cannot call inference; use a "
                                   "tenant's key.")
        if self.tenant.status != "active":
            raise PermissionDenied("This key's tenant is suspended.",
                                   tenant_id=self.tenant_id)
        return self.tenant


class Authenticator:
    def __init__(self, plane: ControlPlane, server_secret: bytes, cache_ttl_s: float,
                 clock_s: Callable[[], float] = time.monotonic,
                 wall_clock_s: Callable[[], float] = time.time) -> None:
        self._plane = plane
        self._server_secret = server_secret
        self._ttl_s = cache_ttl_s
        self._clock_s = clock_s
        self._wall_clock_s = wall_clock_s
        # key id -> (credentials or None for "no such key", expires at)
        self._cache: OrderedDict[str, tuple[Credentials | None, float]] = OrderedDict()
        # Bumped by every eviction: a lookup that raced one is not cached,
        # so a copy read before a change cannot outlive its broadcast.
        self._evictions = 0
        self._reading: dict[str, asyncio.Future[Credentials | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("Expected `Authorization: Bearer <key>`.")
        parsed = apikeys.parse(token.strip())
        found = await self._credentials(parsed.key_id)
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        key, tenant = found
        if (not key.usable_at(self._wall_clock_s())
                or not apikeys.matches(self._server_secret, parsed, key.digest)
                or (tenant is None and key.role != "platform_admin")):
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(tenant_id=key.tenant_id, key_id=key.key_id, role=key.role,
                         priority=tenant.priority if tenant else DEFAULT_PRIORITY,
                         tenant=tenant)

    def evict(self, changed: ControlChanged) -> None:
        """Forgets what `changed` touched: a key, or every key of a tenant
        (a scan of the cache: tenant changes are rare admin operations)."""
        self._evictions += 1
        # A read already under way may return the old copy: later requests read anew.
        self._reading.clear()
        if changed.kind == "key":
            self._cache.pop(changed.id, None)
        elif changed.kind == "tenant":
            for key_id in [key_id for key_id, (found, _) in self._cache.items()
                           if found is not None and found[0].tenant_id == changed.id]:
                del self._cache[key_id]

    async def on_control_changed(self, msg: Msg) -> None:
        """The ControlChanged subscription's callback."""
        try:
            self.evict(control_changed_decoder.decode(msg.data))
        except msgspec.DecodeError:
            # A newer peer's message may not decode here: forget everything.
            self._forget_all("undecodable control change")

    async def on_reconnected(self) -> None:
        """The NATS connection's reconnect callback: a change broadcast while
        it was down was missed, so no cached copy is trusted."""
        self._forget_all("NATS reconnected")

    def _forget_all(self, why: str) -> None:
        log.warning("%s; key cache cleared", why)
        self._evictions += 1
        self._reading.clear()
        self._cache.clear()

    async def _credentials(self, key_id: str) -> Credentials | None:
        hit = self._cache.get(key_id)
        if hit is not None and hit[1] > self._clock_s():
            return hit[0]
        # One read per key at a time: when a busy key's entry expires, the
        # requests arriving meanwhile share it (not one Redis call, and
        # often one new connection, each).
        reading = self._reading.get(key_id)
        if reading is None:
            reading = self._reading[key_id] = asyncio.ensure_future(self._read(key_id))
            reading.add_done_callback(lambda done: self._read_ended(key_id, done))
        return await asyncio.shield(reading)

    def _read_ended(self, key_id: str, done: asyncio.Future[Credentials | None]) -> None:
        if self._reading.get(key_id) is done:
            del self._reading[key_id]

    async def _read(self, key_id: str) -> Credentials | None:
        now_s = self._clock_s()
        evictions = self._evictions
        try:
            found = await self._plane.credentials(key_id)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ServiceUnavailable(f"key store unreachable: {type(exc).__name__}",
                                     retry_after_s=1.0) from None
        if evictions == self._evictions:
            self._cache[key_id] = (found, now_s + self._ttl_s)
            self._cache.move_to_end(key_id)
            while len(self._cache) > MAX_CACHED_KEYS:
                self._cache.popitem(last=False)
        return found
