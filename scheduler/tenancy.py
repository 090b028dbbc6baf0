"""What a tenant may do: its limits, its budget and the prices that turn
tokens into money. Shared by the control store (which keeps them), the
quota actors (which enforce them) and metering (which bills with them).

Money is integer nano-dollars (`_nusd`) everywhere it is added up, so sums
are exact: a price of $0.15 per million tokens is 150 nUSD per token, and a
$1.00 budget is 10**9 nUSD. Prices are given in USD per million tokens with
at most three decimals (finer than any list price).
"""

from __future__ import annotations

from typing import Literal

import msgspec

NUSD_PER_USD = 1_000_000_000
# nUSD per token for a price of 1 USD per million tokens.
NUSD_PER_TOKEN_PER_USD_PER_MTOK = 1_000

BudgetPeriod = Literal["day", "month"]
TenantStatus = Literal["active", "suspended"]


class TenantLimits(msgspec.Struct, frozen=True, kw_only=True):
    """0 means no limit of that kind."""
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent_requests: int = 0
    budget_nusd: int = 0
    budget_period: BudgetPeriod = "month"
    # A request's max_tokens is clamped to this before its cost is reserved.
    max_tokens_cap: int = 0

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests",
                     "budget_nusd", "max_tokens_cap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


NO_LIMITS = TenantLimits()


def usd_per_mtok_to_nusd_per_token(usd_per_mtok: float) -> int:
    """Refuses prices finer than a thousandth of a dollar per million tokens,
    which could not be summed exactly."""
    nusd = usd_per_mtok * NUSD_PER_TOKEN_PER_USD_PER_MTOK
    if usd_per_mtok < 0 or abs(nusd - round(nusd)) > 1e-6:
        raise ValueError(f"price {usd_per_mtok} USD/Mtok: must be >= 0 with at most "
                         "three decimals")
    return round(nusd)


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """A model's price from `effective_from_s` (unix seconds) until the next one's."""
    effective_from_s: int
    input_nusd_per_token: int
    cached_input_nusd_per_token: int
    output_nusd_per_token: int

    def cost_nusd(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        uncached_tokens = max(0, prompt_tokens - cached_tokens)
        return (uncached_tokens * self.input_nusd_per_token
                + min(cached_tokens, prompt_tokens) * self.cached_input_nusd_per_token
                + completion_tokens * self.output_nusd_per_token)


def price_at(prices: tuple[Price, ...], at_s: float) -> Price | None:
    """The price in effect at `at_s` (None: the model is not priced then)."""
    current = None
    for price in sorted(prices, key=lambda p: p.effective_from_s):
        if price.effective_from_s > at_s:
            break
        current = price
    return current
