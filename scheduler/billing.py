"""Monthly statements from billed usage, and the instants and money formats
of the usage API.

A statement has one line per model and price period: a month may span a
price change (of any model: the metering service splits usage at every
change inside the month, and lines of one model under one price are joined
again). Costs are the ones billed at ingest, request by request; money is
integer nano-dollars, shown in USD with all nine decimals, so nothing is
rounded away.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence

import msgspec

from scheduler.tenancy import NUSD_PER_TOKEN_PER_USD_PER_MTOK, NUSD_PER_USD, Price, price_at
from scheduler.wire.usage import StatementUsage

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_UTC = dt.UTC


def usd(nusd: int) -> str:
    """Exact: 1_500_000_001 -> "1.500000001"."""
    sign = "-" if nusd < 0 else ""
    whole, frac = divmod(abs(nusd), NUSD_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def usd_per_mtok(nusd_per_token: int) -> str:
    """A per-token price as USD per million tokens, exact: 150 -> "0.150"."""
    whole, frac = divmod(nusd_per_token, NUSD_PER_TOKEN_PER_USD_PER_MTOK)
    return f"{whole}.{frac:03d}"


def iso_utc(at_s: float) -> str:
    return dt.datetime.fromtimestamp(at_s, _UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant_ms(text: str) -> int:
    """Unix seconds (`1700000000`, `1700000000.5`) or ISO 8601 (`2026-11-01`,
    `2026-11-01T12:00:00Z`; no zone means UTC) as epoch milliseconds."""
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither unix seconds nor ISO 8601") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_UTC)
    return round(when.timestamp() * 1000)


def month_range_s(month: str) -> tuple[int, int]:
    """`YYYY-MM` -> [its first second, the next month's first second) in UTC."""
    found = _MONTH.match(month)
    if found is None or not 1 <= int(found.group(2)) <= 12:
        raise ValueError(f"month {month!r} is not YYYY-MM")
    year, number = int(found.group(1)), int(found.group(2))
    start = dt.datetime(year, number, 1, tzinfo=_UTC)
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=_UTC)
    return int(start.timestamp()), int(end.timestamp())


def period_start_s(period: str, now_s: float) -> int:
    """The start of the budget period ("day" or "month", UTC) holding `now_s`."""
    now = dt.datetime.fromtimestamp(now_s, _UTC)
    start = (now.replace(hour=0, minute=0, second=0, microsecond=0) if period == "day"
             else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    return int(start.timestamp())


def price_breaks(prices: Mapping[str, Sequence[Price]], from_s: int, to_s: int
                 ) -> tuple[int, ...]:
    """Every instant strictly inside [from_s, to_s) where some price starts."""
    return tuple(sorted({p.effective_from_s for model_prices in prices.values()
                         for p in model_prices if from_s < p.effective_from_s < to_s}))


class AppliedPrice(msgspec.Struct, frozen=True, kw_only=True):
    effective_from: str
    input_usd_per_mtok: str
    cached_input_usd_per_mtok: str
    output_usd_per_mtok: str


class StatementLine(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    period_from: str
    period_to: str
    # None: the model had no price then (its usage is billed at 0 and is an
    # anomaly; admission refuses unpriced models).
    price: AppliedPrice | None
    requests: int
    uncached_input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nusd: int
    cost_usd: str


class StatementTotals(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    uncached_input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nusd: int
    cost_usd: str


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    month: str
    period_from: str
    period_to: str
    currency: str
    lines: tuple[StatementLine, ...]
    totals: StatementTotals


def _applied(price: Price | None) -> AppliedPrice | None:
    if price is None:
        return None
    return AppliedPrice(effective_from=iso_utc(price.effective_from_s),
                        input_usd_per_mtok=usd_per_mtok(price.input_nusd_per_token),
                        cached_input_usd_per_mtok=usd_per_mtok(price.cached_input_nusd_per_token),
                        output_usd_per_mtok=usd_per_mtok(price.output_nusd_per_token))


def build_statement(tenant_id: str, month: str, breaks_s: Sequence[int],
                    prices: Mapping[str, Sequence[Price]],
                    usage: Sequence[StatementUsage]) -> Statement:
    """`usage` as the metering service split it at `breaks_s` (price_breaks
    of the month)."""
    from_s, to_s = month_range_s(month)
    edges = [from_s, *breaks_s, to_s]
    # (model, price) -> [first second, end, requests, uncached, cached, output, cost]
    merged: dict[tuple[str, Price | None], list[int]] = {}
    for piece in sorted(usage, key=lambda u: (u.model, u.piece)):
        start_s, end_s = edges[piece.piece], edges[piece.piece + 1]
        price = price_at(tuple(prices.get(piece.model, ())), start_s)
        sums = merged.setdefault((piece.model, price), [start_s, end_s, 0, 0, 0, 0, 0])
        sums[1] = end_s
        for i, value in enumerate((piece.requests, piece.uncached_input_tokens,
                                   piece.cached_input_tokens, piece.output_tokens,
                                   piece.cost_nusd), start=2):
            sums[i] += value
    lines = tuple(
        StatementLine(model=model, period_from=iso_utc(s[0]), period_to=iso_utc(s[1]),
                      price=_applied(price), requests=s[2], uncached_input_tokens=s[3],
                      cached_input_tokens=s[4], output_tokens=s[5], cost_nusd=s[6],
                      cost_usd=usd(s[6]))
        for (model, price), s in merged.items())
    cost = sum(line.cost_nusd for line in lines)
    totals = StatementTotals(
        requests=sum(line.requests for line in lines),
        uncached_input_tokens=sum(line.uncached_input_tokens for line in lines),
        cached_input_tokens=sum(line.cached_input_tokens for line in lines),
        output_tokens=sum(line.output_tokens for line in lines), cost_nusd=cost,
        cost_usd=usd(cost))
    return Statement(tenant_id=tenant_id, month=month, period_from=iso_utc(from_s),
                     period_to=iso_utc(to_s), currency="USD", lines=lines, totals=totals)
