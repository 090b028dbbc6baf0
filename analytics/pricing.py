"""Cost at ingest: each usage event is priced with its model's price in
effect when the request started, read from the control store's `sy:prices`.

A price takes effect now or later, never in the past (ControlPlane.set_price),
so prices read at time T are final for every request that started before T:
the reader reads again only for a batch holding a request that started
after its last read (less a second of clock skew between hosts)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import msgspec
import redis.asyncio as aioredis

from actors.control_plane import PRICES_KEY
from scheduler.tenancy import Price, price_at
from scheduler.wire import UsageEvent

Prices = Mapping[str, tuple[Price, ...]]

# Clocks of the ingress hosts and this one may disagree by this much.
CLOCK_SKEW_S = 1.0

_prices_decoder = msgspec.json.Decoder(tuple[Price, ...])


def event_cost_nusd(event: UsageEvent, prices: Prices) -> int | None:
    """The event's cost; None when its model had no price when it started
    (stored at cost 0 and counted, never dropped). An unbillable event costs 0."""
    if not event.billable:
        return 0
    price = price_at(prices.get(event.model, ()), event.started_at_ms / 1000)
    if price is None:
        return None
    return price.cost_nusd(event.prompt_tokens, event.cached_tokens, event.completion_tokens)


def batch_costs(events: Sequence[UsageEvent], prices: Prices) -> tuple[list[int], int]:
    """Each event's cost (0 where unpriced) and how many were unpriced."""
    costs: list[int] = []
    unpriced = 0
    for event in events:
        cost = event_cost_nusd(event, prices)
        if cost is None:
            unpriced += 1
            cost = 0
        costs.append(cost)
    return costs, unpriced


class PriceReader:
    """`sy:prices`, read again only when a batch needs newer prices."""

    def __init__(self, redis: aioredis.Redis, clock_s: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock_s = clock_s
        self._prices: dict[str, tuple[Price, ...]] = {}
        self._read_at_s = float("-inf")
        self.reads = 0

    async def for_events(self, events: Sequence[UsageEvent]) -> Prices:
        """Prices final for every event in `events`; raises when Redis is away
        and the cached ones may not be."""
        latest_started_s = max((e.started_at_ms for e in events), default=0) / 1000
        if latest_started_s >= self._read_at_s - CLOCK_SKEW_S:
            read_at_s = self._clock_s()
            raw = await self._redis.hgetall(PRICES_KEY)
            self._prices = {model: _prices_decoder.decode(value) for model, value in raw.items()}
            self._read_at_s = read_at_s
            self.reads += 1
        return self._prices
