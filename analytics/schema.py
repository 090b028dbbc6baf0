"""The ClickHouse schema as versioned migrations, applied in order at start
and recorded in `schema_migrations`. The same SQL runs on chDB and on a
server. ClickHouse DDL is not transactional, so every statement is itself
idempotent (IF NOT EXISTS): a crash between a statement and its record is
repaired by running the migration again."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from scheduler.errors import ConfigError

# usage_raw rows as usage_minute rows; shared by the view, the backfill and
# analytics/rollup_repair.py.
# Quantiles over answered requests only: a refused one has no TTFT.
ROLLUP_SELECT = """
        SELECT
            tenant_id, key_id, model,
            toDateTime(toStartOfMinute(started_at), 'UTC') AS minute,
            count() AS requests,
            countIf(status >= 400) AS errors,
            sum(prompt_tokens) AS prompt_tokens,
            sum(cached_tokens) AS cached_tokens,
            sum(completion_tokens) AS completion_tokens,
            sum(cost_nusd) AS cost_nusd,
            quantilesStateIf(0.5, 0.99)(ttft_ms, status < 400) AS ttft_ms_quantiles,
            quantilesStateIf(0.5, 0.99)(latency_ms, status < 400) AS latency_ms_quantiles
        FROM {db}.usage_raw"""

# `{db}` is replaced by the configured database (a checked identifier).
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        # One row per request id. The engine collapses repeats at merge time
        # and FINAL collapses them at read time; insert tokens (see
        # non_replicated_deduplication_window) stop most repeats at insert.
        """
        CREATE TABLE IF NOT EXISTS {db}.usage_raw (
            request_id String,
            tenant_id String,
            key_id String,
            model LowCardinality(String),
            replica_id LowCardinality(String),
            route LowCardinality(String),
            prompt_tokens UInt32,
            cached_tokens UInt32,
            completion_tokens UInt32,
            ttft_ms Float64,
            latency_ms Float64,
            status UInt16,
            error_code LowCardinality(String),
            started_at DateTime64(3, 'UTC'),
            ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree(ingested_at)
        PARTITION BY toYYYYMM(started_at)
        ORDER BY (tenant_id, request_id)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    )),
    (2, (
        # Rows of version 1 keep priority 0 and cost 0: they were never priced.
        """
        ALTER TABLE {db}.usage_raw
            ADD COLUMN IF NOT EXISTS priority Int16 DEFAULT 0 AFTER status,
            ADD COLUMN IF NOT EXISTS cost_nusd Int64 DEFAULT 0 AFTER completion_tokens
        """,
        # Per-minute rollups for dashboards (billing reads usage_raw FINAL).
        # Readers GROUP BY the key, sum() the counts and merge the quantile
        # states: quantilesMerge(0.5, 0.99)(ttft_ms_quantiles) -> [p50, p99].
        # Its own insert dedup window, so a batch whose usage_raw insert was
        # deduplicated is not counted here again either (with the setting
        # deduplicate_blocks_in_dependent_materialized_views on the insert).
        """
        CREATE TABLE IF NOT EXISTS {db}.usage_minute (
            tenant_id String,
            key_id String,
            model LowCardinality(String),
            minute DateTime('UTC'),
            requests SimpleAggregateFunction(sum, UInt64),
            errors SimpleAggregateFunction(sum, UInt64),
            prompt_tokens SimpleAggregateFunction(sum, UInt64),
            cached_tokens SimpleAggregateFunction(sum, UInt64),
            completion_tokens SimpleAggregateFunction(sum, UInt64),
            cost_nusd SimpleAggregateFunction(sum, Int64),
            ttft_ms_quantiles AggregateFunction(quantiles(0.5, 0.99), Float64),
            latency_ms_quantiles AggregateFunction(quantiles(0.5, 0.99), Float64)
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(minute)
        ORDER BY (tenant_id, minute, model, key_id)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_minute_mv TO {db}.usage_minute AS"
        + ROLLUP_SELECT + " GROUP BY tenant_id, key_id, model, minute",
        # Rows stored before this version. Migrations run before the consumer
        # starts, so nothing lands between the view and this insert; the fixed
        # token makes a re-run (after a crash before the record) insert nothing.
        "INSERT INTO {db}.usage_minute"
        " SETTINGS insert_deduplication_token = 'schema-2-backfill'"
        + ROLLUP_SELECT + " FINAL GROUP BY tenant_id, key_id, model, minute",
    )),
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Command = Callable[[str], object]
Query = Callable[[str], Sequence[Sequence[object]]]


def checked_database(name: str) -> str:
    """The database name, which is spliced into SQL, so it must be a plain identifier."""
    if not _IDENTIFIER.match(name):
        raise ConfigError(f"invalid config: clickhouse database {name!r} is not an identifier")
    return name


def apply_migrations(database: str, command: Command, query: Query) -> list[int]:
    """Runs the migrations not yet recorded; returns the versions it applied."""
    db = checked_database(database)
    command(f"CREATE DATABASE IF NOT EXISTS {db}")
    command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations ("
        " version UInt32, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
        " ENGINE = MergeTree ORDER BY version")
    done = {int(row[0]) for row in query(f"SELECT version FROM {db}.schema_migrations")}
    applied: list[int] = []
    for version, statements in MIGRATIONS:
        if version in done:
            continue
        for statement in statements:
            command(statement.format(db=db))
        command(f"INSERT INTO {db}.schema_migrations (version) VALUES ({int(version)})")
        applied.append(version)
    return applied
