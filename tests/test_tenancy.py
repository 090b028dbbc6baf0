"""Prices and limits: exact integer money."""

from __future__ import annotations

import pytest

from scheduler.tenancy import (
    NUSD_PER_USD,
    Price,
    TenantLimits,
    price_at,
    usd_per_mtok_to_nusd_per_token,
)


@pytest.mark.parametrize(("usd_per_mtok", "nusd"), [
    (0.0, 0), (0.15, 150), (2.5, 2_500), (60.0, 60_000), (0.001, 1)])
def test_prices_convert_exactly(usd_per_mtok: float, nusd: int) -> None:
    assert usd_per_mtok_to_nusd_per_token(usd_per_mtok) == nusd


@pytest.mark.parametrize("usd_per_mtok", [-1.0, 0.0005, 1.2345])
def test_prices_that_cannot_be_summed_exactly_are_refused(usd_per_mtok: float) -> None:
    with pytest.raises(ValueError):
        usd_per_mtok_to_nusd_per_token(usd_per_mtok)


def test_cost_splits_cached_and_uncached_prompt_tokens() -> None:
    price = Price(effective_from_s=0, input_nusd_per_token=1_000,
                  cached_input_nusd_per_token=100, output_nusd_per_token=4_000)
    assert price.cost_nusd(prompt_tokens=1_000, cached_tokens=600, completion_tokens=10) == (
        400 * 1_000 + 600 * 100 + 10 * 4_000)
    # Reported cached tokens beyond the prompt are not billed as cached twice.
    assert price.cost_nusd(prompt_tokens=10, cached_tokens=50, completion_tokens=0) == 10 * 100
    # A million output tokens at $4/Mtok is $4.
    assert price.cost_nusd(0, 0, 1_000_000) == 4 * NUSD_PER_USD


@pytest.mark.parametrize(("at_s", "expected_from_s"), [
    (99, None), (100, 100), (150, 100), (200, 200), (10**10, 200)])
def test_the_price_in_effect_is_the_latest_started(at_s: int, expected_from_s: int | None) -> None:
    prices = tuple(Price(effective_from_s=s, input_nusd_per_token=s, cached_input_nusd_per_token=0,
                         output_nusd_per_token=0) for s in (200, 100))
    found = price_at(prices, at_s)
    assert (found.effective_from_s if found else None) == expected_from_s


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        TenantLimits(requests_per_minute=-1)
