"""Which models are priced, as the ingress checks at admission: a model
with no price in effect is refused (403 model_not_priced) for every tenant,
limits or not, so nothing is ever served unbilled. Checked here, on the
request path, rather than by the quota shards: a tenant without limits may
be admitted without asking its shard (under a lease, or while NATS is down).

Prices (`sy:prices`, model -> JSON array of Price) are read from Redis and
cached for `ttl_s`; a ControlChanged of kind `price` drops the model's
entry at once. A price is never removed once set (only later ones added),
so when Redis cannot be read a cached copy is still right about a model it
saw priced; with no copy at all the request fails closed (503).

A model nobody serves is not priced either: it is told apart by the replica
registry (read only for unpriced models) and is a 404, as the schedulers
answer for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.msg import Msg

from actors.control_plane import PRICES_KEY
from actors.control_store import ReplicaRegistry
from scheduler.errors import ModelNotFound, ModelNotPriced, ServiceUnavailable
from scheduler.tenancy import Price, price_at
from scheduler.wire import control_changed_decoder

_prices_decoder = msgspec.json.Decoder(tuple[Price, ...])
# Model names come from clients: past this many cached, the cache starts over.
MAX_CACHED_MODELS = 1_024


class PriceBook:
    def __init__(self, redis: aioredis.Redis, ttl_s: float, registry: ReplicaRegistry,
                 clock_s: Callable[[], float] = time.monotonic,
                 wall_s: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._clock_s = clock_s
        self._wall_s = wall_s
        self._registry = registry
        # model -> (fresh until, its prices, whether a replica serves it).
        self._cache: dict[str, tuple[float, tuple[Price, ...], bool]] = {}
        self._reading: dict[str, asyncio.Future[tuple[tuple[Price, ...], bool]]] = {}

    async def require(self, model: str, tenant_id: str) -> None:
        """Raises ModelNotPriced unless `model` has a price in effect now
        (ModelNotFound when no replica serves it)."""
        prices, served = await self._lookup(model)
        if price_at(prices, self._wall_s()) is not None:
            return
        if not served:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        raise ModelNotPriced(f"Model {model} has no price; it cannot be served.",
                             param="model", tenant_id=tenant_id)

    async def on_control_changed(self, msg: Msg) -> None:
        """The ControlChanged subscription's callback."""
        try:
            changed = control_changed_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._cache.clear()
            return
        if changed.kind == "price":
            self._cache.pop(changed.id, None)

    async def _lookup(self, model: str) -> tuple[tuple[Price, ...], bool]:
        cached = self._cache.get(model)
        if cached is not None and cached[0] > self._clock_s():
            return cached[1], cached[2]
        # One read per model at a time: a burst of first requests shares it.
        reading = self._reading.get(model)
        if reading is None:
            reading = self._reading[model] = asyncio.ensure_future(self._read(model, cached))
            reading.add_done_callback(lambda _: self._reading.pop(model, None))
        return await asyncio.shield(reading)

    async def _read(self, model: str, cached: tuple[float, tuple[Price, ...], bool] | None
                    ) -> tuple[tuple[Price, ...], bool]:
        try:
            raw = await self._redis.hget(PRICES_KEY, model)
            prices = () if raw is None else _prices_decoder.decode(raw)
            served = bool(prices) or any(model in info.models
                                         for info in await self._registry.replicas())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if cached is not None:
                return cached[1], cached[2]
            raise ServiceUnavailable(f"price store unreachable: {type(exc).__name__}",
                                     retry_after_s=1.0) from None
        if len(self._cache) >= MAX_CACHED_MODELS:
            self._cache.clear()
        self._cache[model] = (self._clock_s() + self._ttl_s, prices, served)
        return prices, served
