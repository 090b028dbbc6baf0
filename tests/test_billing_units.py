"""Pure units of usage and billing: money and instants, statements split at
price changes, CSV exports, webhook signatures and budget thresholds, and
the usage API's wire messages."""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io

import msgspec
import pytest

from scheduler.billing import (
    build_statement,
    iso_utc,
    month_range_s,
    parse_instant_ms,
    period_start_s,
    price_breaks,
    usd,
    usd_per_mtok,
)
from scheduler.exports import check_groups, statement_csv, usage_columns, usage_csv
from scheduler.tenancy import Price
from scheduler.webhook_events import (
    crossed_thresholds,
    signature,
    signed_headers,
    usage_cloudevent,
    verify,
)
from scheduler.wire import UsageEvent, encode
from scheduler.wire.usage import (
    BudgetAlert,
    StatementQuery,
    StatementReply,
    StatementUsage,
    UsageRow,
    UsageRowsQuery,
    UsageRowsReply,
    budget_alert_decoder,
    statement_query_decoder,
    statement_reply_decoder,
    usage_rows_query_decoder,
    usage_rows_reply_decoder,
)

OCT_S, NOV_S, MID_OCT_S = 1_790_812_800, 1_793_491_200, 1_792_022_400


@pytest.mark.parametrize(("nusd", "text"), [
    (0, "0.000000000"), (1, "0.000000001"), (1_500_000_001, "1.500000001"),
    (10**9, "1.000000000"), (-2_500_000_000, "-2.500000000"), (123 * 10**12, "123000.000000000"),
])
def test_usd_is_exact(nusd: int, text: str) -> None:
    assert usd(nusd) == text


@pytest.mark.parametrize(("nusd", "text"), [(150, "0.150"), (0, "0.000"), (15_000, "15.000"),
                                            (1, "0.001")])
def test_usd_per_mtok(nusd: int, text: str) -> None:
    assert usd_per_mtok(nusd) == text


@pytest.mark.parametrize(("text", "ms"), [
    ("1790812800", OCT_S * 1000), ("1790812800.25", OCT_S * 1000 + 250),
    ("2026-10-01", OCT_S * 1000), ("2026-10-01T00:00:00Z", OCT_S * 1000),
    ("2026-10-01T02:00:00+02:00", OCT_S * 1000), ("2026-10-01T00:00:01.5", OCT_S * 1000 + 1500),
])
def test_instants(text: str, ms: int) -> None:
    assert parse_instant_ms(text) == ms


@pytest.mark.parametrize("text", ["yesterday", "", "2026-13-01", "1e"])
def test_bad_instants(text: str) -> None:
    with pytest.raises(ValueError):
        parse_instant_ms(text)


@pytest.mark.parametrize(("month", "span"), [
    ("2026-10", (OCT_S, NOV_S)), ("2026-12", (1_796_083_200, 1_798_761_600)),
    ("2024-02", (1_706_745_600, 1_709_251_200)),
])
def test_month_ranges(month: str, span: tuple[int, int]) -> None:
    assert month_range_s(month) == span


@pytest.mark.parametrize("month", ["2026-13", "2026-00", "26-10", "2026-1", "2026-10-01"])
def test_bad_months(month: str) -> None:
    with pytest.raises(ValueError):
        month_range_s(month)


@pytest.mark.parametrize(("period", "now_s", "start_s"), [
    ("day", MID_OCT_S + 3_600, MID_OCT_S), ("month", MID_OCT_S + 3_600, OCT_S),
    ("day", OCT_S, OCT_S), ("month", NOV_S - 1, OCT_S),
])
def test_budget_periods(period: str, now_s: int, start_s: int) -> None:
    assert period_start_s(period, now_s) == start_s


def _price(from_s: int, out: int) -> Price:
    return Price(effective_from_s=from_s, input_nusd_per_token=10,
                 cached_input_nusd_per_token=5, output_nusd_per_token=out)


PRICES = {"a": (_price(0, 40), _price(MID_OCT_S, 60)), "b": (_price(OCT_S + 86_400, 100),),
          "c": (_price(NOV_S, 1),)}


def test_price_breaks_are_the_changes_inside_the_range() -> None:
    assert price_breaks(PRICES, OCT_S, NOV_S) == (OCT_S + 86_400, MID_OCT_S)
    assert price_breaks(PRICES, NOV_S, NOV_S + 86_400) == ()


def _usage(model: str, piece: int, requests: int, cost: int) -> StatementUsage:
    return StatementUsage(model=model, piece=piece, requests=requests,
                          uncached_input_tokens=10 * requests, cached_input_tokens=requests,
                          output_tokens=2 * requests, cost_nusd=cost)


def test_statement_lines_follow_each_models_prices() -> None:
    breaks = price_breaks(PRICES, OCT_S, NOV_S)
    usage = [_usage("a", 0, 1, 100), _usage("a", 1, 2, 200), _usage("a", 2, 4, 400),
             _usage("b", 0, 1, 0), _usage("b", 2, 3, 300)]
    statement = build_statement("t", "2026-10", breaks, PRICES, usage)
    got = [(line.model, line.period_from, line.period_to, line.requests, line.cost_nusd,
            None if line.price is None else line.price.output_usd_per_mtok)
           for line in statement.lines]
    assert got == [
        # Pieces 0 and 1 of "a" share a price (b's change splits them): one line.
        ("a", "2026-10-01T00:00:00Z", "2026-10-15T00:00:00Z", 3, 300, "0.040"),
        ("a", "2026-10-15T00:00:00Z", "2026-11-01T00:00:00Z", 4, 400, "0.060"),
        # Before its first price "b" was unpriced: a line of its own, at 0.
        ("b", "2026-10-01T00:00:00Z", "2026-10-02T00:00:00Z", 1, 0, None),
        ("b", "2026-10-15T00:00:00Z", "2026-11-01T00:00:00Z", 3, 300, "0.100"),
    ]
    t = statement.totals
    assert (t.requests, t.cost_nusd, t.cost_usd) == (11, 1000, "0.000001000")
    assert t.uncached_input_tokens == 110 and t.cached_input_tokens == 11
    assert (statement.period_from, statement.period_to) == ("2026-10-01T00:00:00Z",
                                                            "2026-11-01T00:00:00Z")


def test_an_empty_month_is_a_zero_statement() -> None:
    statement = build_statement("t", "2026-10", (), PRICES, ())
    assert statement.lines == () and statement.totals.cost_usd == "0.000000000"


def test_statement_csv_has_lines_then_a_total() -> None:
    statement = build_statement("t", "2026-10", (), PRICES, [_usage("a", 0, 2, 7)])
    rows = list(csv.reader(io.StringIO(statement_csv(statement))))
    assert rows[0][:3] == ["line", "model", "period_from"]
    assert [r[0] for r in rows[1:]] == ["model", "total"]
    assert rows[1][-2:] == rows[2][-2:] == ["7", "0.000000007"]


@pytest.mark.parametrize(("given", "groups"), [
    ([], ()), (["day", "model"], ("model", "day")), (["key", "model", "minute"],
                                                     ("model", "key", "minute")),
])
def test_groups_in_canonical_order(given: list[str], groups: tuple[str, ...]) -> None:
    assert check_groups(given) == groups


@pytest.mark.parametrize("given", [["tenant"], ["model", "model"], ["day", "hour"]])
def test_bad_groups(given: list[str]) -> None:
    with pytest.raises(ValueError):
        check_groups(given)


def test_usage_csv_quotes_and_round_trips() -> None:
    rows = [UsageRow(tenant_id="t", model='org/m,"v2"', day="2026-10-01T00:00:00Z", requests=3,
                     errors=1, prompt_tokens=30, cached_tokens=10, completion_tokens=5,
                     cost_nusd=12, ttft_p50_ms=0.1 + 0.2, ttft_p99_ms=1e-7,
                     latency_p50_ms=12.5, latency_p99_ms=99.0, cache_hit_rate=1 / 3)]
    text = usage_csv(("model", "day"), rows)
    assert text.count("\r\n") == 2 and '"org/m,""v2"""' in text
    parsed = [msgspec.convert(r, UsageRow, strict=False) for r in csv.DictReader(io.StringIO(text))]
    assert parsed == rows
    assert next(csv.reader(io.StringIO(text))) == list(usage_columns(("model", "day")))


@pytest.mark.parametrize(("spent", "budget", "crossed"), [
    (0, 100, ()), (49, 100, ()), (50, 100, (50,)), (79, 100, (50,)), (80, 100, (50, 80)),
    (100, 100, (50, 80, 100)), (500, 100, (50, 80, 100)), (10**12, 0, ()),
    (5 * 10**17, 10**18, (50,)),
])
def test_budget_thresholds(spent: int, budget: int, crossed: tuple[int, ...]) -> None:
    assert crossed_thresholds(spent, budget) == crossed


def test_signature_is_standard_webhooks_hmac() -> None:
    # HMAC-SHA256("secret", "id-1.1700000000.{}") in base64.
    want = base64.b64encode(hmac.new(b"secret", b"id-1.1700000000.{}",
                                     hashlib.sha256).digest()).decode()
    assert signature(b"secret", "id-1", 1_700_000_000, b"{}") == "v1," + want
    headers = signed_headers(b"secret", "id-1", 1_700_000_000, b"{}")
    assert verify(b"secret", headers, b"{}")
    assert not verify(b"secret", headers, b"{ }")
    assert not verify(b"other", headers, b"{}")
    assert not verify(b"secret", {**headers, "webhook-timestamp": "1700000001"}, b"{}")
    rotated = {**headers, "webhook-signature": "v1,AAAA " + headers["webhook-signature"]}
    assert verify(b"secret", rotated, b"{}")
    assert not verify(b"secret", {"webhook-id": "id-1"}, b"{}")


def test_usage_cloudevent() -> None:
    event = UsageEvent(request_id="r-1", tenant_id="t", key_id="k", model="m",
                       prompt_tokens=3, completion_tokens=4, started_at_ms=OCT_S * 1000 + 5)
    ce = usage_cloudevent(event, 77, "switchyard")
    assert (ce["id"], ce["type"], ce["subject"], ce["time"]) == (
        "r-1", "dev.switchyard.usage.v1", "t", "2026-10-01T00:00:00.005Z")
    assert ce["data"]["cost_nusd"] == 77 and "kind" not in ce["data"]
    assert iso_utc(OCT_S) == "2026-10-01T00:00:00Z"


WIRE_CASES = [
    (UsageRowsQuery(tenant_id=None, from_ms=1, to_ms=2, group_by=("model", "day")),
     usage_rows_query_decoder),
    (UsageRowsReply(rows=(UsageRow(tenant_id="t", key_id="k", requests=1, errors=0,
                                   prompt_tokens=2, cached_tokens=1, completion_tokens=3,
                                   cost_nusd=4, ttft_p50_ms=1.5, ttft_p99_ms=2.5,
                                   latency_p50_ms=3.0, latency_p99_ms=4.0,
                                   cache_hit_rate=0.5),)), usage_rows_reply_decoder),
    (UsageRowsReply(error="x"), usage_rows_reply_decoder),
    (StatementQuery(tenant_id="t", from_ms=1, to_ms=2, breaks_s=(1, 2)), statement_query_decoder),
    (StatementReply(usage=(_usage("m", 1, 2, 3),)), statement_reply_decoder),
    (BudgetAlert(tenant_id="t", period="day", period_start_s=1, threshold_pct=80,
                 budget_nusd=10, spent_nusd=8, at_s=2), budget_alert_decoder),
]


@pytest.mark.parametrize(("message", "decoder"), WIRE_CASES,
                         ids=[type(m).__name__ for m, _ in WIRE_CASES])
def test_wire_messages_round_trip(message: object, decoder: msgspec.json.Decoder) -> None:
    assert decoder.decode(encode(message)) == message


def test_a_usage_row_shows_only_its_groups() -> None:
    row = UsageRow(tenant_id="t", model="m", requests=0, errors=0, prompt_tokens=0,
                   cached_tokens=0, completion_tokens=0, cost_nusd=0, ttft_p50_ms=0.0,
                   ttft_p99_ms=0.0, latency_p50_ms=0.0, latency_p99_ms=0.0, cache_hit_rate=0.0)
    assert list(msgspec.json.decode(encode(row))) == ["tenant_id", "model", *usage_columns(())[1:]]
