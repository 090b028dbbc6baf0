"""Tenants' limits and models' prices as the control store keeps them in
Redis, read by the quota shards and cached briefly.

A ControlChanged broadcast (`forget`) drops the changed tenant's limits or
model's prices at once; the TTL bounds a copy whose broadcast was lost.

Layout (shared with the control store): the tenant hash `sy:tenant:<id>`
has a field `limits`, a TenantLimits as JSON (absent: no limits); the hash
`sy:prices` maps a model to a JSON array of Price (absent: not priced)."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis

from actors.control_plane import PRICES_KEY, TENANT_KEY
from scheduler.tenancy import NO_LIMITS, Price, TenantLimits
from scheduler.wire import ControlChanged

LIMITS_FIELD = "limits"

_limits_decoder = msgspec.json.Decoder(TenantLimits)
_prices_decoder = msgspec.json.Decoder(tuple[Price, ...])


class TenancyReader:
    """A malformed stored value raises msgspec.DecodeError (or ValueError):
    the caller fails closed rather than admit on limits it cannot read."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.clock_s = clock_s
        self._limits: dict[str, tuple[float, TenantLimits]] = {}
        self._prices: dict[str, tuple[float, tuple[Price, ...]]] = {}

    def forget(self, changed: ControlChanged | None) -> None:
        """Drops what `changed` touched (None: everything, e.g. a change
        that could not be decoded)."""
        if changed is None:
            self._limits.clear()
            self._prices.clear()
        elif changed.kind == "tenant":
            self._limits.pop(changed.id, None)
        elif changed.kind == "price":
            self._prices.pop(changed.id, None)

    async def limits(self, tenant_id: str) -> TenantLimits:
        cached = self._limits.get(tenant_id)
        if cached is not None and cached[0] > self.clock_s():
            return cached[1]
        raw = await self.redis.hget(TENANT_KEY.format(tenant_id=tenant_id), LIMITS_FIELD)
        limits = NO_LIMITS if raw is None else _limits_decoder.decode(raw)
        self._limits[tenant_id] = (self.clock_s() + self.ttl_s, limits)
        return limits

    async def prices(self, model: str) -> tuple[Price, ...]:
        cached = self._prices.get(model)
        if cached is not None and cached[0] > self.clock_s():
            return cached[1]
        raw = await self.redis.hget(PRICES_KEY, model)
        prices = () if raw is None else _prices_decoder.decode(raw)
        self._prices[model] = (self.clock_s() + self.ttl_s, prices)
        return prices
