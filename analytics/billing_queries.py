"""Usage rows and statement usage out of ClickHouse, answered over NATS by the
metering service (which owns the store: nothing else opens chDB).

Time series read the per-minute rollup `usage_minute`; statements read
`usage_raw FINAL` (one row per request id, the cost billed at ingest). The
SQL is built only from fixed fragments; every value is a bound parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from analytics.store import UsageStore
from scheduler.exports import check_groups
from scheduler.wire import STATEMENT_SUBJECT, USAGE_ROWS_SUBJECT, encode
from scheduler.wire.usage import (
    StatementQuery,
    StatementReply,
    StatementUsage,
    UsageRow,
    UsageRowsQuery,
    UsageRowsReply,
    statement_query_decoder,
    usage_rows_query_decoder,
)

log = logging.getLogger("switchyard.billing")

# One answer per query even if several metering services share a server.
QUERY_QUEUE = "yard-metering"
ISO_MINUTE = "'%Y-%m-%dT%H:%i:00Z'"
# group -> (its SELECT expression, its UsageRow field)
_GROUP_COLUMNS = {
    "model": ("model", "model"),
    "key": ("key_id", "key_id"),
    "day": (f"formatDateTime(toStartOfDay(minute), {ISO_MINUTE}, 'UTC')", "day"),
    "hour": (f"formatDateTime(toStartOfHour(minute), {ISO_MINUTE}, 'UTC')", "hour"),
    "minute": (f"formatDateTime(minute, {ISO_MINUTE}, 'UTC')", "minute"),
}
_MEASURES = (
    "sum(requests)", "sum(errors)", "sum(prompt_tokens)", "sum(cached_tokens)",
    "sum(completion_tokens)", "sum(cost_nusd)",
    "quantilesMerge(0.5, 0.99)(ttft_ms_quantiles)",
    "quantilesMerge(0.5, 0.99)(latency_ms_quantiles)",
)

StoreCall = Callable[..., Awaitable[object]]


def usage_rows_sql(database: str, query: UsageRowsQuery) -> tuple[str, dict[str, object]]:
    groups = check_groups(query.group_by)
    keys = ["tenant_id"] + [_GROUP_COLUMNS[g][0] for g in groups]
    where = ["minute >= toDateTime(intDiv({from_ms:Int64}, 1000), 'UTC')",
             "minute < toDateTime(intDiv({to_ms:Int64}, 1000), 'UTC')"]
    parameters: dict[str, object] = {"from_ms": query.from_ms, "to_ms": query.to_ms}
    if query.tenant_id is not None:
        where.append("tenant_id = {tenant:String}")
        parameters["tenant"] = query.tenant_id
    numbered = ", ".join(str(i + 1) for i in range(len(keys)))
    sql = (f"SELECT {', '.join(keys)}, {', '.join(_MEASURES)}"
           f" FROM {database}.usage_minute WHERE {' AND '.join(where)}"
           f" GROUP BY {numbered} ORDER BY {numbered}")
    return sql, parameters


def usage_rows(store: UsageStore, query: UsageRowsQuery) -> tuple[UsageRow, ...]:
    """Runs in the store process."""
    sql, parameters = usage_rows_sql(store.database, query)
    fields = ["tenant_id"] + [_GROUP_COLUMNS[g][1] for g in check_groups(query.group_by)]
    rows = []
    for found in store.client.query(sql, parameters=parameters).result_rows:
        keys, measures = found[:len(fields)], found[len(fields):]
        requests, errors, prompt, cached, completion, cost, ttft, latency = measures
        rows.append(UsageRow(
            **dict(zip(fields, keys, strict=True)), requests=int(requests), errors=int(errors),
            prompt_tokens=int(prompt), cached_tokens=int(cached),
            completion_tokens=int(completion), cost_nusd=int(cost),
            ttft_p50_ms=_finite(ttft[0]), ttft_p99_ms=_finite(ttft[1]),
            latency_p50_ms=_finite(latency[0]), latency_p99_ms=_finite(latency[1]),
            cache_hit_rate=int(cached) / int(prompt) if prompt else 0.0))
    return tuple(rows)


def _finite(value: float) -> float:
    """A quantile over no values is nan, which JSON cannot carry."""
    return float(value) if value == value else 0.0


def statement_usage(store: UsageStore, query: StatementQuery) -> tuple[StatementUsage, ...]:
    """Runs in the store process. Cached tokens beyond the prompt are billed as
    the prompt (as Price.cost_nusd does), so the pieces add up to the cost."""
    sql = (
        "SELECT model, arrayCount(b -> b <= toUnixTimestamp(started_at), {breaks:Array(Int64)})"
        " AS piece, count(), sum(prompt_tokens - least(cached_tokens, prompt_tokens)),"
        " sum(least(cached_tokens, prompt_tokens)), sum(completion_tokens), sum(cost_nusd)"
        f" FROM {store.database}.usage_raw FINAL"
        " WHERE tenant_id = {tenant:String}"
        " AND started_at >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
        " AND started_at < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
        " GROUP BY model, piece ORDER BY model, piece")
    parameters = {"tenant": query.tenant_id, "from_ms": query.from_ms, "to_ms": query.to_ms,
                  "breaks": list(query.breaks_s)}
    return tuple(
        StatementUsage(model=model, piece=int(piece), requests=int(requests),
                       uncached_input_tokens=int(uncached), cached_input_tokens=int(cached),
                       output_tokens=int(output), cost_nusd=int(cost))
        for model, piece, requests, uncached, cached, output, cost
        in store.client.query(sql, parameters=parameters).result_rows)


class BillingQueries:
    """Serves USAGE_ROWS_SUBJECT and STATEMENT_SUBJECT; `in_store` runs a
    module-level function with the store as its first argument in the store
    process."""

    def __init__(self, in_store: StoreCall, counts: dict[str, int]) -> None:
        self._in_store = in_store
        self._counts = counts

    async def subscribe(self, nc: NatsClient) -> list[Subscription]:
        return [await nc.subscribe(USAGE_ROWS_SUBJECT, queue=QUERY_QUEUE, cb=self._on_rows),
                await nc.subscribe(STATEMENT_SUBJECT, queue=QUERY_QUEUE,
                                   cb=self._on_statement)]

    async def _on_rows(self, msg: Msg) -> None:
        try:
            query = usage_rows_query_decoder.decode(msg.data)
            check_groups(query.group_by)
            reply = UsageRowsReply(rows=await self._in_store(usage_rows, query))  # type: ignore[arg-type]
        except (msgspec.DecodeError, ValueError) as exc:
            reply = UsageRowsReply(error=f"bad usage query: {exc}")
        except Exception as exc:
            log.warning("usage rows query failed", exc_info=True)
            reply = UsageRowsReply(error=f"usage query failed: {exc}")
        await self._respond(msg, reply)

    async def _on_statement(self, msg: Msg) -> None:
        try:
            query = statement_query_decoder.decode(msg.data)
            reply = StatementReply(usage=await self._in_store(statement_usage, query))  # type: ignore[arg-type]
        except msgspec.DecodeError as exc:
            reply = StatementReply(error=f"bad statement query: {exc}")
        except Exception as exc:
            log.warning("statement query failed", exc_info=True)
            reply = StatementReply(error=f"statement query failed: {exc}")
        await self._respond(msg, reply)

    async def _respond(self, msg: Msg, reply: UsageRowsReply | StatementReply) -> None:
        self._counts["queries"] += 1
        if reply.error:
            self._counts["query_failures"] += 1
        if msg.reply:
            await msg.respond(encode(reply))
