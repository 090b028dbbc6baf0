"""Cost at ingest: each usage event is priced with its model's price in
effect when the request started, read from the control store's `sy:prices`.

A price takes effect now or later, never in the past (ControlPlane.set_price),
so prices read at time T are final for every request that started before T:
the reader reads again only for a batch holding a request that started
after its last read (less a second of clock skew between hosts)."""

from __future__ import annotations

import time
from bisect import bisect_right
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


def batch_costs(events: Sequence[UsageEvent], prices: Prices) -> tuple[list[int], list[int]]:
    """Each event's cost as event_cost_nusd prices it (0 where unpriced), and
    the positions of the unpriced ones. Each model's prices are ordered once per
    call, not once per event: this runs for every event the consumer stores."""
    schedules: dict[str, tuple[list[int], list[Price]]] = {}
    for model, model_prices in prices.items():
        ordered = sorted(model_prices, key=lambda p: p.effective_from_s)
        schedules[model] = ([p.effective_from_s * 1000 for p in ordered], ordered)
    costs: list[int] = []
    unpriced: list[int] = []
    for i, event in enumerate(events):
        schedule = schedules.get(event.model)
        at = bisect_right(schedule[0], event.started_at_ms) if schedule else 0
        if not event.billable:
            costs.append(0)
        elif at == 0:
            unpriced.append(i)
            costs.append(0)
        else:
            costs.append(schedule[1][at - 1].cost_nusd(  # type: ignore[index]
                event.prompt_tokens, event.cached_tokens, event.completion_tokens))
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
