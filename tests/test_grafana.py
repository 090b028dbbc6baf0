"""The Grafana dashboards under deploy/grafana/dashboards/: the JSON parses,
every panel and variable queries the ClickHouse data source, and every
query's SQL, with the plugin's macros and the template variables expanded,
runs on a chDB store at the current schema (migration 2 applied) and gives
the numbers of the rows stored there."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from analytics.schema import MIGRATIONS
from analytics.store import UsageStore, open_store, usage_columns
from scheduler.config import ClickHouseConfig
from scheduler.wire import UsageEvent

pytestmark = pytest.mark.integration

DASHBOARDS = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
PLUGIN = "grafana-clickhouse-datasource"
DATABASE = "yard_grafana"
FROM_S, TO_S = 1_791_158_400, 1_791_158_400 + 3_600  # 2026-10-05 00:00-01:00 UTC
INTERVAL_S = 60
TENANTS, MODELS = ("t-a", "t-b"), ("big", "tiny")

# The plugin's macros (its pkg/macros), as it expands them for a time range.
MACROS = {
    r"\$__timeFilter\((\w+)\)":
        lambda m: f"{m[1]} >= toDateTime({FROM_S}) AND {m[1]} <= toDateTime({TO_S})",
    r"\$__timeInterval\((\w+)\)":
        lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {INTERVAL_S} second)",
    r"\$__fromTime\b": lambda m: f"toDateTime({FROM_S})",
    r"\$__toTime\b": lambda m: f"toDateTime({TO_S})",
    r"\$__interval_s\b": lambda m: str(INTERVAL_S),
}
# Grafana's template variables: a multi-value variable with `:singlequote`
# becomes a quoted list.
VARIABLES = {
    "${database}": DATABASE,
    "${tenant:singlequote}": ", ".join(f"'{t}'" for t in TENANTS),
    "${model:singlequote}": ", ".join(f"'{m}'" for m in MODELS),
}


def expand(sql: str) -> str:
    for name, value in VARIABLES.items():
        sql = sql.replace(name, value)
    for pattern, replace in MACROS.items():
        sql = re.sub(pattern, replace, sql)
    assert "$" not in sql, f"a macro or variable this test does not know: {sql}"
    return sql


def _dashboards() -> list[dict[str, Any]]:
    paths = sorted(DASHBOARDS.glob("*.json"))
    assert paths
    return [json.loads(path.read_text()) for path in paths]


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, raw SQL) of every panel target and query variable."""
    found = [(f"panel {p['title']!r}", t["rawSql"])
             for p in dashboard["panels"] for t in p["targets"]]
    found += [(f"variable {v['name']!r}", v["query"])
              for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def test_dashboards_parse_and_query_clickhouse() -> None:
    for dashboard in _dashboards():
        assert dashboard["uid"] and dashboard["panels"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["query"] == PLUGIN
        for panel in dashboard["panels"]:
            assert panel["datasource"]["type"] == PLUGIN, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                assert target["editorType"] == "sql" and target["rawSql"].strip()


def _events() -> list[UsageEvent]:
    events = []
    for i in range(120):
        events.append(UsageEvent(
            request_id=f"g-{i}", tenant_id=TENANTS[i % 2], key_id="k", model=MODELS[i % 3 % 2],
            replica_id="r0", route="chat", prompt_tokens=100 + i, cached_tokens=i % 50,
            completion_tokens=10 + i, ttft_ms=20.0 + i, latency_ms=200.0 + i,
            status=500 if i % 10 == 0 else 200,
            started_at_ms=(FROM_S + 30 * i) * 1000))
    return events


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UsageStore]:
    store = open_store(ClickHouseConfig(interface="chdb", path=str(tmp_path / "chdb"),
                                        database=DATABASE), str(tmp_path))
    assert store.migrate() == [version for version, _ in MIGRATIONS]
    events = _events()
    store.insert(usage_columns(events, [1_000 * (i + 1) for i in range(len(events))]),
                 "grafana-seed")
    yield store
    store.close()


def test_every_query_runs_on_the_current_schema(store: UsageStore) -> None:
    for dashboard in _dashboards():
        for where, sql in _queries(dashboard):
            try:
                rows = store.client.query(expand(sql)).result_rows
            except Exception as exc:  # noqa: BLE001 - reported with the panel's name
                pytest.fail(f"{dashboard['uid']} {where}: {exc}")
            assert rows, f"{dashboard['uid']} {where} found nothing in the seeded hour"


def _panel_rows(title: str, store: UsageStore) -> list[tuple]:
    (dashboard,) = [d for d in _dashboards() if d["uid"] == "switchyard-usage"]
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    return list(store.client.query(expand(panel["targets"][0]["rawSql"])).result_rows)


def test_the_usage_panels_give_the_stored_numbers(store: UsageStore) -> None:
    events = _events()
    assert _panel_rows("Requests", store) == [(len(events),)]
    assert _panel_rows("Cost", store)[0][0] == pytest.approx(
        sum(1_000 * (i + 1) for i in range(len(events))) / 1e9)
    per_model = {}
    for _, model, requests in _panel_rows("Requests per model", store):
        per_model[model] = per_model.get(model, 0) + requests
    assert per_model == {m: sum(e.model == m for e in events) for m in MODELS}
    errors = sum(row[2] for row in _panel_rows("Errors per model", store))
    assert errors == sum(e.status >= 400 for e in events)
    billed = _panel_rows("Billed usage per tenant and model (usage_raw FINAL)", store)
    assert sum(row[2] for row in billed) == len(events)
    assert sum(row[5] for row in billed) == sum(e.completion_tokens for e in events)
    ttft = _panel_rows("Time to first token p50 / p99", store)
    assert ttft and all(20.0 <= p50 <= p99 <= 20.0 + len(events) for _, _, p50, p99 in ttft)
