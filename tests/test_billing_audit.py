"""The T31 checker (analytics/billing_audit.py) on small crafted histories:
a clean run passes, and each kind of violation is found and named."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from analytics.billing_audit import (
    Allowances,
    BilledRow,
    HistoryEntry,
    OpenCharge,
    TruthLine,
    audit,
    fold_truth,
    pre_upstream,
    render,
)
from loadtests.simulator.ledger import RequestRecord
from loadtests.simulator.truth_log import TruthLog


def entry(request_id: str, status: int = 200, tokens: int = 5, tenant: str = "t1",
          code: str = "", cut: bool = False, max_tokens: int = 10,
          stream: bool = True) -> HistoryEntry:
    return HistoryEntry(request_id=request_id, tenant_id=tenant, stream=stream, status=status,
                        error_code=code, tokens_seen=tokens, max_tokens=max_tokens, cut=cut)


def truth(request_id: str, completion: int = 5, replica: str = "sim-0", prompt: int = 7,
          reason: str | None = "length") -> TruthLine:
    return TruthLine(replica_id=replica, request_id=request_id, prompt_tokens=prompt,
                     completion_tokens=completion, finish_reason=reason)


def row(request_id: str, completion: int = 5, tenant: str = "t1", replica: str = "sim-0",
        prompt: int = 7, status: int = 200, code: str = "") -> BilledRow:
    return BilledRow(request_id=request_id, tenant_id=tenant, replica_id=replica,
                     prompt_tokens=prompt, completion_tokens=completion, status=status,
                     error_code=code)


CLEAN = dict(
    history=[entry("r1"), entry("r2", tokens=3, cut=True),
             entry("r3", status=429, tokens=0, code="rate_limit_exceeded"),
             entry("r4", status=401, tokens=0, tenant="", code="invalid_api_key"),
             entry("", status=0, tokens=0, cut=True, stream=False)],
    truth=[truth("r1", 2, reason=None), truth("r1"), truth("r2", 3, reason="abort"),
           truth("r5", 4)],
    rows=[row("r1"), row("r2", 3), row("r5", 4)],
    charges=[OpenCharge(tenant_id="t1", charge_id="lease-1", lease=True)],
)

CASES = {
    "clean": (CLEAN, []),
    "a: a 200 never billed": (
        {**CLEAN, "rows": [row("r2", 3), row("r5", 4)]}, ["a"]),
    "a: billed to two tenants (FINAL keeps both)": (
        {**CLEAN, "rows": [*CLEAN["rows"], row("r1", tenant="t2")]}, ["a", "d"]),
    "a: raw duplicate of one tenant is no violation": (
        {**CLEAN, "rows": [*CLEAN["rows"], row("r1")]}, []),
    "b: refused before upstream, yet billed": (
        {**CLEAN, "rows": [*CLEAN["rows"], row("r3", 0)]}, ["b", "c"]),
    "b: refused before upstream, yet a replica saw it": (
        {**CLEAN, "truth": [*CLEAN["truth"], truth("r3", 0)]}, ["b"]),
    "c: a cut stream billed short": (
        {**CLEAN, "rows": [row("r1"), row("r2", 2), row("r5", 4)]}, ["c"]),
    "c: billed over max_tokens": (
        {**CLEAN, "rows": [row("r1", 11), row("r2", 3), row("r5", 4)],
         "truth": [truth("r1", 11), truth("r2", 3), truth("r5", 4)]}, ["c"]),
    "c: billed on a replica that never saw it": (
        {**CLEAN, "rows": [row("r1", replica="sim-1"), row("r2", 3), row("r5", 4)]},
        ["c"]),
    "d: an id the client never saw, billed to another tenant": (
        {**CLEAN, "rows": [row("r1"), row("r2", 3), row("r5", 4, tenant="t2")]}, ["d"]),
    "d: more unknown ids than requests without an id": (
        {**CLEAN, "rows": [*CLEAN["rows"], row("r6", 1)],
         "truth": [*CLEAN["truth"], truth("r6", 1)]}, ["d"]),
    "e: a reservation left open": (
        {**CLEAN, "charges": [*CLEAN["charges"],
                              OpenCharge(tenant_id="t1", charge_id="r1", lease=False)]}, ["e"]),
}


@pytest.mark.parametrize("name", CASES)
def test_audit_finds_exactly_the_violations(name: str) -> None:
    given, expected = CASES[name]
    report = audit(given["history"], given["truth"], given["rows"], given["charges"])
    assert sorted(v.check for v in report.violations) == expected, render(report)
    assert report.ok == (not expected)


@pytest.mark.parametrize(("billed", "status", "gap_allowed", "violations", "gaps"), [
    (1, 499, 1, ["c"], 0),  # 3 generated: a gap of 2, one more than allowed
    (2, 499, 2, [], 1),
    (2, 200, 2, ["c"], 0),  # the client did not leave: no gap is known
    (4, 499, 2, ["c"], 0),  # over the truth is never a gap
    (3, 499, 0, [], 0),
])
def test_abort_gap_is_allowed_only_where_the_client_left(
        billed: int, status: int, gap_allowed: int, violations: list[str], gaps: int) -> None:
    rows = [row("r1"), row("r2", billed, status=status), row("r5", 4)]
    report = audit(CLEAN["history"], CLEAN["truth"], rows, [],
                   Allowances(abort_gap_tokens=gap_allowed))
    assert [v.check for v in report.violations] == violations, render(report)
    assert report.stats["abort_gap_requests"] == gaps


@pytest.mark.parametrize(("billed", "code", "reason", "gap_allowed", "violations", "gaps"), [
    (4, "upstream_failed", None, 1, [], 1),  # the replica counted a token it never sent
    (3, "upstream_failed", None, 1, ["c"], 0),  # a gap of 2, one more than allowed
    (4, "", None, 1, ["c"], 0),  # no replica failure: no gap is known
    (4, "upstream_failed", "length", 1, ["c"], 0),  # the replica finished: it sent them all
    (6, "upstream_failed", None, 1, ["c"], 0),  # over the truth is never a gap
])
def test_death_gap_is_allowed_only_where_the_replica_died_unfinished(
        billed: int, code: str, reason: str | None, gap_allowed: int, violations: list[str],
        gaps: int) -> None:
    """r6: a stream whose replica logged 5 tokens and died under it (502)."""
    history = [*CLEAN["history"], entry("r6", tokens=billed, code="upstream_failed")]
    rows = [*CLEAN["rows"], row("r6", billed, status=502, code=code)]
    report = audit(history, [*CLEAN["truth"], truth("r6", 5, reason=reason)], rows, [],
                   Allowances(death_gap_tokens=gap_allowed))
    assert [v.check for v in report.violations] == violations, render(report)
    assert report.stats["death_gap_requests"] == gaps


@pytest.mark.parametrize(("billed_prompt", "billed", "status", "allowed", "violations"), [
    (4, 0, 499, True, []),  # no chunk reached the ingress: the prompt at its estimate
    (4, 0, 499, False, ["c"]),
    (4, 1, 499, True, ["c"]),  # a chunk did arrive, with the replica's prompt count
    (4, 0, 200, True, ["c"]),
])
def test_prompt_estimate_is_allowed_only_without_any_chunk(
        billed_prompt: int, billed: int, status: int, allowed: bool,
        violations: list[str]) -> None:
    rows = [row("r1"), row("r2", billed, status=status, prompt=billed_prompt), row("r5", 4)]
    report = audit(CLEAN["history"], CLEAN["truth"], rows, [],
                   Allowances(abort_gap_tokens=3, prompt_estimate=allowed))
    assert [v.check for v in report.violations] == violations, render(report)
    assert report.stats["prompt_estimate_requests"] == (0 if violations else 1)


def test_report_counts_under_billing_and_duplicates() -> None:
    rows = [row("r1"), row("r1"), row("r2", 1), row("r5", 4)]
    report = audit(CLEAN["history"], CLEAN["truth"], rows, [])
    assert report.stats["rows_raw_duplicates"] == 1
    assert (report.stats["under_billed_requests"], report.stats["under_billed_tokens"]) == (1, 2)
    assert "(c) 1 violations" in render(report)


def test_report_counts_tokens_of_attempts_that_did_not_serve() -> None:
    retried = [*CLEAN["truth"], truth("r5", 3, replica="sim-1", reason=None)]
    report = audit(CLEAN["history"], retried, CLEAN["rows"], [])
    assert report.ok, render(report)
    assert report.stats["unbilled_attempt_tokens"] == 3


@pytest.mark.parametrize(("status", "code", "before"), [
    (401, "invalid_api_key", True), (404, "model_not_found", True),
    (429, "insufficient_quota", True), (503, "quota_unavailable", True),
    (503, "no_capacity", True), (502, "upstream_failed", False), (200, "", False),
    (200, "upstream_failed", False), (0, "client:ClientOSError", False), (499, "", False),
])
def test_pre_upstream(status: int, code: str, before: bool) -> None:
    assert pre_upstream(entry("r", status=status, code=code)) is before


def test_truth_log_lines_decode_as_the_checker_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    log = TruthLog(path, "sim-3")
    record = RequestRecord(request_id="r9", prompt_tokens=7, started_at_s=0.0)
    log.note(record)
    record.completion_tokens = 4
    record.finish_reason = "abort"
    log.note(record)
    log.close()
    lines = [msgspec.json.decode(line, type=TruthLine) for line in path.read_bytes().splitlines()]
    assert fold_truth(lines) == {("sim-3", "r9"): truth("r9", 4, "sim-3", 7, "abort")}
