"""Rewrites per-minute rollups that disagree with usage_raw.

An insert into usage_raw is not atomic with the view that feeds
usage_minute: a store killed between the two writes keeps the raw rows
without their rollup, and the retry finds those rows stored and skips them
(as it must: billing reads usage_raw). So wherever the consumer finds rows
of a redelivered or retried batch already stored, it rechecks the rollup
groups (tenant, key, model, minute) of those rows against usage_raw FINAL
and rewrites each that differs: its rows deleted, then recomputed from
usage_raw FINAL. That runs rarely (after crashes, lost acks and ambiguous
inserts), and it is safe because one store process runs every insert and
repair in turn: nothing lands in a group between its delete and its
rewrite. A crash in between leaves the triggering batch unacked; its
redelivery finds the rows stored again and repeats the repair.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from analytics.schema import ROLLUP_SELECT
from analytics.store import UsageStore

log = logging.getLogger("switchyard.metering")
_GROUP = "tenant_id, key_id, model, minute"
_RAW_MINUTE = "toDateTime(toStartOfMinute(started_at), 'UTC')"
# What a group's rollup must equal: usage_raw FINAL's counts for its rows.
_SUMS = ("count() AS requests, countIf(status >= 400) AS errors,"
         " sum(prompt_tokens) AS prompt, sum(cached_tokens) AS cached,"
         " sum(completion_tokens) AS completion, sum(cost_nusd) AS cost")
_ROLLUP_SUMS = ("sum(requests) AS requests, sum(errors) AS errors,"
                " sum(prompt_tokens) AS prompt, sum(cached_tokens) AS cached,"
                " sum(completion_tokens) AS completion, sum(cost_nusd) AS cost")
Group = tuple[str, str, str, datetime]


def repair_rollups(store: UsageStore, tenant_ids: Sequence[str],
                   request_ids: Sequence[str]) -> int:
    """Rewrites the rollup groups of these stored rows that disagree with
    usage_raw FINAL; returns how many it rewrote."""
    groups = _disagreeing_groups(store, tenant_ids, request_ids)
    if groups:
        _rewrite(store, groups)
        log.warning("rewrote %d per-minute rollup groups from usage_raw", len(groups))
    return len(groups)


def _disagreeing_groups(store: UsageStore, tenant_ids: Sequence[str],
                        request_ids: Sequence[str]) -> list[Group]:
    db = store.database
    raw_groups = (f"SELECT DISTINCT tenant_id, key_id, model, {_RAW_MINUTE} AS minute"
                  f" FROM {db}.usage_raw WHERE tenant_id IN {{tenants:Array(String)}}"
                  " AND request_id IN {ids:Array(String)}")
    sql = (
        f"WITH groups AS ({raw_groups})"
        f" SELECT {_GROUP} FROM"
        f" (SELECT tenant_id, key_id, model, {_RAW_MINUTE} AS minute, {_SUMS}"
        f"  FROM {db}.usage_raw FINAL WHERE tenant_id IN {{tenants:Array(String)}}"
        f"  AND ({_GROUP}) IN (SELECT {_GROUP} FROM groups) GROUP BY {_GROUP}) AS raw"
        f" LEFT JOIN"
        f" (SELECT {_GROUP}, {_ROLLUP_SUMS} FROM {db}.usage_minute"
        f"  WHERE tenant_id IN {{tenants:Array(String)}}"
        f"  AND ({_GROUP}) IN (SELECT {_GROUP} FROM groups) GROUP BY {_GROUP}) AS rollup"
        f" USING ({_GROUP})"
        " WHERE (raw.requests, raw.errors, raw.prompt, raw.cached, raw.completion, raw.cost)"
        " != (rollup.requests, rollup.errors, rollup.prompt, rollup.cached,"
        " rollup.completion, rollup.cost)")
    parameters = {"tenants": sorted(set(tenant_ids)), "ids": list(request_ids)}
    return [tuple(row) for row in store.client.query(sql, parameters=parameters).result_rows]


def _rewrite(store: UsageStore, groups: list[Group]) -> None:
    db = store.database
    parameters = {"groups": groups}
    in_groups = "({columns}) IN {{groups:Array(Tuple(String, String, String, DateTime('UTC')))}}"
    store.client.command(
        f"ALTER TABLE {db}.usage_minute DELETE WHERE {in_groups.format(columns=_GROUP)}"
        " SETTINGS mutations_sync = 2", parameters=parameters)
    # A token of its own: an identical earlier block must not absorb it.
    store.client.command(
        f"INSERT INTO {db}.usage_minute"
        f" SETTINGS insert_deduplication_token = 'repair-{uuid.uuid4().hex}'"
        + ROLLUP_SELECT.format(db=db)
        + f" FINAL WHERE {in_groups.format(columns=f'tenant_id, key_id, model, {_RAW_MINUTE}')}"
        f" GROUP BY {_GROUP}", parameters=parameters)
