"""CSV exports (RFC 4180: a header row, CRLF line ends, quoting where
needed) of usage rows and statements. A usage export has exactly the JSON
rows' fields as columns, in the same order, with floats in their shortest
round-tripping form, so parsing it gives the JSON rows back.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from scheduler.billing import Statement
from scheduler.wire.usage import TIME_GROUPS, UsageRow

USAGE_MEASURES = (
    "requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_nusd",
    "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms", "cache_hit_rate",
)
# group -> its column, in canonical order
GROUP_COLUMNS = {"model": "model", "key": "key_id", "day": "day", "hour": "hour",
                 "minute": "minute"}
STATEMENT_COLUMNS = (
    "line", "model", "period_from", "period_to", "price_effective_from",
    "input_usd_per_mtok", "cached_input_usd_per_mtok", "output_usd_per_mtok", "requests",
    "uncached_input_tokens", "cached_input_tokens", "output_tokens", "cost_nusd", "cost_usd",
)


def check_groups(group_by: Sequence[str]) -> tuple[str, ...]:
    """The groups in canonical order; raises ValueError for an unknown one,
    a repeat, or more than one time bucket."""
    unknown = [g for g in group_by if g not in GROUP_COLUMNS]
    if unknown:
        raise ValueError(f"unknown group {unknown[0]!r} (model, key, day, hour, minute)")
    if len(set(group_by)) != len(group_by):
        raise ValueError("a group is given twice")
    if sum(g in TIME_GROUPS for g in group_by) > 1:
        raise ValueError("at most one of day, hour, minute")
    return tuple(g for g in GROUP_COLUMNS if g in group_by)


def usage_columns(groups: Sequence[str]) -> tuple[str, ...]:
    """The columns for `groups` in canonical order (check_groups)."""
    return ("tenant_id", *(GROUP_COLUMNS[g] for g in groups), *USAGE_MEASURES)


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def usage_csv(groups: Sequence[str], rows: Sequence[UsageRow]) -> str:
    # repr: the shortest text that parses back to the same float.
    columns = usage_columns(groups)
    return _csv(columns, ([repr(v) if isinstance(v, float) else v
                           for v in (getattr(row, c) for c in columns)] for row in rows))


def statement_csv(statement: Statement) -> str:
    """One `model` row per line, then one `total` row."""
    rows: list[list[object]] = []
    for line in statement.lines:
        price = line.price
        prices = (["", "", "", ""] if price is None else
                  [price.effective_from, price.input_usd_per_mtok,
                   price.cached_input_usd_per_mtok, price.output_usd_per_mtok])
        rows.append(["model", line.model, line.period_from, line.period_to, *prices,
                     line.requests, line.uncached_input_tokens, line.cached_input_tokens,
                     line.output_tokens, line.cost_nusd, line.cost_usd])
    t = statement.totals
    rows.append(["total", "", statement.period_from, statement.period_to, "", "", "", "",
                 t.requests, t.uncached_input_tokens, t.cached_input_tokens, t.output_tokens,
                 t.cost_nusd, t.cost_usd])
    return _csv(STATEMENT_COLUMNS, rows)
