"""The usage and statement operations of the admin API: parse the query,
ask the metering service (router/metering_client.py), answer JSON or CSV.
Who may call them was checked before (router/admin_app.py); a tenant key's
usage query is its own tenant's whatever it asks for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from router.admin_handlers import Call
from scheduler.admin_api import CsvExport, UsageRows
from scheduler.billing import build_statement, month_range_s, parse_instant_ms, price_breaks
from scheduler.control import SYSTEM
from scheduler.errors import InvalidRequest, RecordNotFound
from scheduler.exports import check_groups, statement_csv, usage_csv
from scheduler.wire.usage import StatementQuery, UsageRowsQuery

DEFAULT_USAGE_SPAN_MS = 86_400_000
FORMATS = ("json", "csv")


def _instant_ms(query: Mapping[str, str], name: str, default_ms: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default_ms
    try:
        return parse_instant_ms(raw)
    except ValueError as exc:
        raise InvalidRequest(f"`{name}`: {exc}", param=name) from None


def _format(query: Mapping[str, str]) -> str:
    fmt = query.get("format") or "json"
    if fmt not in FORMATS:
        raise InvalidRequest("`format` must be json or csv.", param="format")
    return fmt


def usage_query(call: Call, now_ms: int) -> UsageRowsQuery:
    actor = call.who
    tenant_id = (call.query.get("tenant_id") or None if actor.role == "platform_admin"
                 else actor.tenant_id)
    to_ms = _instant_ms(call.query, "to", now_ms)
    from_ms = _instant_ms(call.query, "from", to_ms - DEFAULT_USAGE_SPAN_MS)
    if from_ms >= to_ms:
        raise InvalidRequest("`from` must be before `to`.", param="from")
    try:
        groups = check_groups([g.strip() for g in call.query.get("group_by", "").split(",")
                               if g.strip()])
    except ValueError as exc:
        raise InvalidRequest(f"`group_by`: {exc}", param="group_by") from None
    return UsageRowsQuery(tenant_id=tenant_id, from_ms=from_ms, to_ms=to_ms,
                          group_by=groups)  # type: ignore[arg-type]


async def get_usage(call: Call) -> Any:
    fmt = _format(call.query)
    query = usage_query(call, int(time.time() * 1000))
    rows = await call.metering.usage_rows(query)
    if fmt == "csv":
        return CsvExport(text=usage_csv(query.group_by, rows), filename="usage.csv")
    return UsageRows(rows=rows)


async def get_statement(call: Call) -> Any:
    fmt = _format(call.query)
    tenant_id, month = call.path["tenant_id"], call.path["month"]
    try:
        from_s, to_s = month_range_s(month)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="month") from None
    if await call.plane.tenant(tenant_id) is None:
        raise RecordNotFound("No such record.")
    # The caller may read this statement (checked); the prices it applies
    # are read as the system, whatever the caller may list.
    prices = await call.plane.prices(SYSTEM)
    breaks_s = price_breaks(prices, from_s, to_s)
    usage = await call.metering.statement_usage(StatementQuery(
        tenant_id=tenant_id, from_ms=from_s * 1000, to_ms=to_s * 1000, breaks_s=breaks_s))
    statement = build_statement(tenant_id, month, breaks_s, prices, usage)
    if fmt == "csv":
        return CsvExport(text=statement_csv(statement),
                         filename=f"statement-{tenant_id}-{month}.csv")
    return statement


BILLING_HANDLERS = {"get_usage": get_usage, "get_statement": get_statement}
