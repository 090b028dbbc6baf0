"""The ClickHouse schema as versioned migrations, applied in order at start
and recorded in `schema_migrations`. The same SQL runs on chDB and on a
server. ClickHouse DDL is not transactional, so every statement is itself
idempotent (IF NOT EXISTS): a crash between a statement and its record is
repaired by running the migration again."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from scheduler.errors import ConfigError

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
