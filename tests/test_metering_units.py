"""Metering's pure parts: cost at ingest, when prices are read again, the
retry delays, the insert token, and the dead-letter message."""

from __future__ import annotations

import msgspec
import pytest

from analytics.pricing import PriceReader, batch_costs, event_cost_nusd
from analytics.usage_consumer import dedup_token, retry_delay_s
from scheduler.tenancy import Price
from scheduler.wire import UsageDeadLetter, UsageEvent, encode, usage_dead_letter_decoder

OLD = Price(effective_from_s=1_000, input_nusd_per_token=100, cached_input_nusd_per_token=10,
            output_nusd_per_token=400)
NEW = Price(effective_from_s=2_000, input_nusd_per_token=200, cached_input_nusd_per_token=20,
            output_nusd_per_token=800)
PRICES = {"m": (NEW, OLD)}


def usage(started_at_s: float, model: str = "m", prompt: int = 10, cached: int = 4,
          completion: int = 5, billable: bool = True) -> UsageEvent:
    return UsageEvent(request_id="r", tenant_id="t", key_id="k", model=model,
                      prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
                      started_at_ms=int(started_at_s * 1000), billable=billable)


@pytest.mark.parametrize(("event", "cost"), [
    # 6 uncached * 100 + 4 cached * 10 + 5 out * 400
    (usage(1_500), 6 * 100 + 4 * 10 + 5 * 400),
    (usage(1_000), 6 * 100 + 4 * 10 + 5 * 400),      # the first second of OLD
    (usage(1_999.999), 6 * 100 + 4 * 10 + 5 * 400),  # the last millisecond of OLD
    (usage(2_000), 6 * 200 + 4 * 20 + 5 * 800),      # NEW from its first second
    (usage(999.999), None),                          # before any price: unpriced
    (usage(1_500, model="other"), None),             # no price at all
    (usage(1_500, cached=50), 10 * 10 + 5 * 400),    # cached is at most the prompt
    (usage(1_500, billable=False), 0),
    (usage(1_500, model="other", billable=False), 0),
])
def test_event_cost_is_the_price_when_it_started(event: UsageEvent, cost: int | None) -> None:
    assert event_cost_nusd(event, PRICES) == cost


def test_batch_costs_price_each_event_as_event_cost_nusd() -> None:
    """The batch path (ordered once per batch, bisected per event) agrees with
    the per-event one on every case above, in one batch."""
    events = [usage(1_500), usage(1_000), usage(1_999.999), usage(2_000), usage(999.999),
              usage(1_500, model="other"), usage(1_500, cached=50),
              usage(1_500, billable=False), usage(1_500, model="other", billable=False)]
    costs, unpriced = batch_costs(events, PRICES)
    assert costs == [event_cost_nusd(e, PRICES) or 0 for e in events]
    assert unpriced == [4, 5]
    assert batch_costs([], PRICES) == ([], [])


class FakeRedis:
    """HGETALL of one hash, counted; `fail` makes it raise as Redis away would."""

    def __init__(self) -> None:
        self.prices: dict[str, str] = {}
        self.calls = 0
        self.fail = False

    async def hgetall(self, key: str) -> dict[str, str]:
        assert key == "sy:prices"
        self.calls += 1
        if self.fail:
            raise ConnectionError("redis away")
        return dict(self.prices)


def set_price(redis: FakeRedis, model: str, *prices: Price) -> None:
    redis.prices[model] = msgspec.json.encode(prices).decode()


async def test_price_reader_reads_again_only_for_newer_requests() -> None:
    redis = FakeRedis()
    now_s = [10_000.0]
    reader = PriceReader(redis, clock_s=lambda: now_s[0])  # type: ignore[arg-type]
    set_price(redis, "m", OLD)
    assert await reader.for_events([usage(9_000)]) == {"m": (OLD,)}
    assert redis.calls == 1
    # Started well before the read: the prices read then are final.
    set_price(redis, "m", OLD, NEW)
    assert await reader.for_events([usage(5_000), usage(9_998.9)]) == {"m": (OLD,)}
    assert redis.calls == 1
    # Within the clock skew of the read, or after it: read again.
    assert await reader.for_events([usage(5_000), usage(9_999.5)]) == {"m": (OLD, NEW)}
    assert redis.calls == 2
    now_s[0] = 20_000.0
    assert await reader.for_events([usage(12_000)]) == {"m": (OLD, NEW)}
    assert redis.calls == 3
    assert await reader.for_events([usage(11_000)]) == {"m": (OLD, NEW)}
    assert redis.calls == 3


async def test_price_reader_raises_when_redis_is_away_and_prices_may_be_stale() -> None:
    redis = FakeRedis()
    reader = PriceReader(redis, clock_s=lambda: 10_000.0)  # type: ignore[arg-type]
    set_price(redis, "m", OLD)
    await reader.for_events([usage(9_000)])
    redis.fail = True
    # Older requests are priced from what was read.
    assert await reader.for_events([usage(8_000)]) == {"m": (OLD,)}
    with pytest.raises(ConnectionError):
        await reader.for_events([usage(8_000), usage(10_000)])


@pytest.mark.parametrize(("deliveries", "delay_s"), [
    (0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (8, 60.0), (50, 60.0)])
def test_retry_delay_doubles_per_delivery_up_to_a_cap(deliveries: int, delay_s: float) -> None:
    assert retry_delay_s(deliveries) == delay_s


def test_dedup_token_depends_on_the_ids_not_their_order() -> None:
    assert dedup_token(["a", "b"]) == dedup_token(["b", "a"])
    assert dedup_token(["a"]) != dedup_token(["a", "b"])
    # "ab" + "" and "a" + "b" must not collide.
    assert dedup_token(["ab", ""]) != dedup_token(["a", "b"])


def test_dead_letter_round_trips_with_any_payload() -> None:
    letter = UsageDeadLetter(reason="undecodable", subject="yard.usage.t", stream_seq=7,
                             deliveries=3, payload=b"\x00\xff not json")
    assert usage_dead_letter_decoder.decode(encode(letter)) == letter
