"""The usage and billing API end to end: usage seeded through JetStream and
the real MeteringService (chDB), read through the real admin API.
Statement totals equal the raw usage of the month (the generator's truth,
priced request by request) and the usage rollup; CSV exports round-trip."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from deploy.admin_cli import ADMIN_KEY_ENV, run_admin
from deploy.cli import _parser
from scheduler.billing import parse_instant_ms
from scheduler.tenancy import price_at
from scheduler.wire import UsageEvent
from scheduler.wire.usage import UsageRow
from tests.billing_stack import (
    NOV_2026_S,
    OCT_2026_S,
    PRICES,
    BillingStack,
    running_billing,
)

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, private_bus: str,
                redis_url: str) -> AsyncIterator[BillingStack]:
    async with running_billing(tmp_path_factory.mktemp("billing"), private_bus,
                               redis_url) as running:
        yield running


async def get(stack: BillingStack, path: str, key: str = "platform",
              **params: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(
            stack.admin.url + path, params=params,
            headers={"Authorization": f"Bearer {stack.admin.keys[key]}"}) as resp:
        return resp.status, resp.content_type, await resp.text()


def cost_nusd(e: UsageEvent) -> int:
    price = price_at(PRICES[e.model], e.started_at_ms / 1000)
    assert price is not None
    return price.cost_nusd(e.prompt_tokens, e.cached_tokens, e.completion_tokens)


def october(stack: BillingStack, tenant_id: str) -> list[UsageEvent]:
    return [e for e in stack.events if e.tenant_id == tenant_id
            and OCT_2026_S * 1000 <= e.started_at_ms < NOV_2026_S * 1000]


async def test_statement_totals_equal_the_raw_usage(stack: BillingStack) -> None:
    tenant = stack.admin.tenant_a
    status, _, text = await get(stack, f"/admin/v1/tenants/{tenant}/statements/2026-10")
    assert status == 200, text
    statement = msgspec.json.decode(text)
    truth = october(stack, tenant)
    totals = statement["totals"]
    assert totals["requests"] == len(truth)
    assert totals["uncached_input_tokens"] + totals["cached_input_tokens"] == sum(
        e.prompt_tokens for e in truth)
    assert totals["cached_input_tokens"] == sum(e.cached_tokens for e in truth)
    assert totals["output_tokens"] == sum(e.completion_tokens for e in truth)
    assert totals["cost_nusd"] == sum(cost_nusd(e) for e in truth)
    whole, frac = totals["cost_usd"].split(".")
    assert int(whole) * 10**9 + int(frac) == totals["cost_nusd"] and len(frac) == 9
    # The usage rollup of the same month agrees.
    status, _, text = await get(stack, "/admin/v1/usage", tenant_id=tenant,
                                **{"from": "2026-10-01T00:00:00Z", "to": str(NOV_2026_S)})
    (row,) = msgspec.json.decode(text)["rows"]
    assert (row["requests"], row["cost_nusd"]) == (totals["requests"], totals["cost_nusd"])


async def test_statement_lines_split_at_a_price_change(stack: BillingStack) -> None:
    tenant = stack.admin.tenant_a
    _, _, text = await get(stack, f"/admin/v1/tenants/{tenant}/statements/2026-10")
    lines = msgspec.json.decode(text)["lines"]
    assert [(line["model"], line["period_from"], line["period_to"]) for line in lines] == [
        ("big", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"),
        ("tiny", "2026-10-01T00:00:00Z", "2026-10-15T00:00:00Z"),
        ("tiny", "2026-10-15T00:00:00Z", "2026-11-01T00:00:00Z")]
    assert [line["price"]["output_usd_per_mtok"] for line in lines] == ["15.000", "0.400",
                                                                      "0.600"]
    truth = october(stack, tenant)
    for line in lines:
        from_ms, to_ms = (parse_instant_ms(line[k]) for k in ("period_from", "period_to"))
        mine = [e for e in truth if e.model == line["model"] and from_ms <= e.started_at_ms < to_ms]
        assert line["requests"] == len(mine)
        assert line["cost_nusd"] == sum(cost_nusd(e) for e in mine)


async def test_statement_csv(stack: BillingStack) -> None:
    tenant = stack.admin.tenant_a
    status, content_type, text = await get(
        stack, f"/admin/v1/tenants/{tenant}/statements/2026-10", format="csv")
    assert (status, content_type) == (200, "text/csv")
    assert text.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["line"] for r in rows] == ["model", "model", "model", "total"]
    assert sum(int(r["cost_nusd"]) for r in rows[:-1]) == int(rows[-1]["cost_nusd"])


def parse_usage_csv(text: str) -> list[UsageRow]:
    """Types come from UsageRow: the CSV carries exactly its fields."""
    return [msgspec.convert(row, UsageRow, strict=False)
            for row in csv.DictReader(io.StringIO(text))]


@pytest.mark.parametrize("group_by", ["", "model", "model,key,day", "hour", "key,minute"])
async def test_usage_csv_round_trips(stack: BillingStack, group_by: str) -> None:
    params = {"from": str(OCT_2026_S - 10 * 86_400), "to": str(NOV_2026_S + 10 * 86_400),
              "group_by": group_by}
    status, _, text = await get(stack, "/admin/v1/usage", **params)
    assert status == 200, text
    rows = msgspec.json.decode(text, type=dict[str, list[UsageRow]])["rows"]
    assert rows and sum(r.requests for r in rows) == len(stack.events)
    assert sum(r.errors for r in rows) == sum(e.status >= 400 for e in stack.events)
    status, content_type, exported = await get(stack, "/admin/v1/usage", format="csv", **params)
    assert (status, content_type) == (200, "text/csv")
    assert parse_usage_csv(exported) == rows
    first = msgspec.json.decode(text)["rows"][0]
    assert next(csv.reader(io.StringIO(exported))) == list(first)


async def test_usage_groups_and_quantiles(stack: BillingStack) -> None:
    _, _, text = await get(stack, "/admin/v1/usage", group_by="model,day",
                           **{"from": "2026-10-01", "to": "2026-10-02"})
    rows: list[dict[str, Any]] = msgspec.json.decode(text)["rows"]
    assert {r["day"] for r in rows} == {"2026-10-01T00:00:00Z"}
    for r in rows:
        assert set(r) >= {"tenant_id", "model", "day", "ttft_p50_ms", "cache_hit_rate"}
        assert "key_id" not in r and "hour" not in r
        assert 5 <= r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= 300 or r["errors"] == r["requests"]
        assert r["cache_hit_rate"] == pytest.approx(r["cached_tokens"] / r["prompt_tokens"])


async def test_tenant_keys_see_their_own_usage_only(stack: BillingStack) -> None:
    span = {"from": str(OCT_2026_S - 10 * 86_400), "to": str(NOV_2026_S + 10 * 86_400)}
    _, _, text = await get(stack, "/admin/v1/usage", key="a_viewer", **span)
    rows = msgspec.json.decode(text)["rows"]
    assert [r["tenant_id"] for r in rows] == [stack.admin.tenant_a]
    assert rows[0]["requests"] == sum(e.tenant_id == stack.admin.tenant_a for e in stack.events)
    status, _, _ = await get(stack, "/admin/v1/usage", key="b_admin",
                             tenant_id=stack.admin.tenant_a, **span)
    assert status == 404
    status, _, _ = await get(stack, f"/admin/v1/tenants/{stack.admin.tenant_a}/statements/"
                                    "2026-10", key="b_admin")
    assert status == 404


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/admin/v1/usage", {"group_by": "model,tenant"}, "group_by"),
    ("/admin/v1/usage", {"group_by": "day,hour"}, "group_by"),
    ("/admin/v1/usage", {"from": "yesterday"}, "from"),
    ("/admin/v1/usage", {"from": "2026-10-02", "to": "2026-10-01"}, "from"),
    ("/admin/v1/usage", {"format": "xml"}, "format"),
    ("/admin/v1/tenants/{tenant}/statements/2026-13", {}, "month"),
])
async def test_bad_queries_are_400s_naming_the_parameter(
        stack: BillingStack, path: str, params: dict[str, str], param: str) -> None:
    status, _, text = await get(stack, path.format(tenant=stack.admin.tenant_a), **params)
    assert status == 400, text
    assert msgspec.json.decode(text)["error"]["param"] == param


async def cli(stack: BillingStack, *argv: str, identity: str = "platform") -> str:
    args = _parser().parse_args([*argv, "--admin-url", stack.admin.url])
    out = io.StringIO()
    env = {ADMIN_KEY_ENV: stack.admin.keys[identity]}
    assert await run_admin(stack.admin.cfg, args, out, env) == 0
    return out.getvalue()


async def test_cli_usage_and_statement(stack: BillingStack) -> None:
    tenant = stack.admin.tenant_a
    span = ("--from", "2026-10-01T00:00:00Z", "--to", "2026-11-01T00:00:00Z")
    rows = json.loads(await cli(stack, "usage", "--tenant", tenant, *span,
                                "--group-by", "model,key,day"))["rows"]
    assert {r["tenant_id"] for r in rows} == {tenant}
    exported = await cli(stack, "usage", "--tenant", tenant, *span, "--group-by",
                         "model,key,day", "--format", "csv")
    assert parse_usage_csv(exported) == msgspec.convert(rows, list[UsageRow])
    # A tenant key's usage is its own tenant's without --tenant.
    own = json.loads(await cli(stack, "usage", *span, identity="a_viewer"))["rows"]
    assert [r["tenant_id"] for r in own] == [tenant]
    statement = json.loads(await cli(stack, "billing", "statement", "--tenant", tenant,
                                     "--month", "2026-10"))
    assert statement["totals"]["requests"] == len(october(stack, tenant)) == own[0]["requests"]
    text = await cli(stack, "billing", "statement", "--tenant", tenant, "--month", "2026-10",
                     "--format", "csv")
    assert text.startswith("line,model,period_from")
