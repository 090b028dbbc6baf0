"""The offline billing checker of RELIABILITY T31 (loadtests/jepsen): pure,
over four records of one run, each read by its caller:

- the history: what every client saw (request id from the response, tenant
  of the key it used, status, tokens received, whether it left early);
- the ground truth: what each replica really generated, per (replica,
  request id), from the simulator's truth log;
- the usage rows in ClickHouse, raw (no FINAL: duplicates are counted here);
- the quota charges still open in the ledgers at quiescence.

Checks, each violation named by its letter:
(a) a request that got a 200 or at least one token has exactly one billed row
    (one after FINAL, which collapses repeats of (tenant_id, request_id));
(b) a request refused before any replica has no row and no ground truth;
(c) a billed row's tokens equal the serving replica's ground truth, and
    never exceed its prompt + max_tokens. Two known deviations of requests
    whose client left (status 499) may be allowed (Allowances), and are then
    counted in the stats instead: the abort gap (billed the replica's count
    on the last chunk that reached the ingress, while the replica generated
    a few more before it saw the connection close), and the prompt estimate
    (no chunk reached the ingress, so the prompt is billed at its estimate);
    so may one of a stream whose replica died under it (upstream_failed,
    the replica never finished): the death gap, tokens the replica counted
    but that never reached the ingress (no one can bill those);
(d) no row is billed to a tenant other than the one whose key sent it, and
    no row lacks a request in the history (ids a client never saw, a
    non-streaming client that left before the headers, are matched by count
    within the tenant);
(e) no request reservation is open at quiescence (leases may be).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import msgspec

# Error codes the ingress answers before any replica is called.
PRE_UPSTREAM_CODES = frozenset({
    "invalid_api_key", "model_not_found", "rate_limit_exceeded", "insufficient_quota",
    "no_capacity", "queue_timeout", "queue_full", "quota_unavailable", "usage_spool_full",
    "model_not_priced", "invalid_request_error", "request_too_large", "permission_denied",
})
# The status metered for a request whose client left.
CLIENT_CLOSED = 499
# The error code metered for a request whose replica failed under it.
UPSTREAM_FAILED = "upstream_failed"
# Shown in full; beyond it a check's violations are counted only.
MAX_SHOWN_PER_CHECK = 10


class HistoryEntry(msgspec.Struct, kw_only=True):
    """One client request as the client saw it."""

    # From the response's x-request-id; "" when the client never got one
    # (it left before the headers, or the connection failed).
    request_id: str
    # The tenant whose key the client used ("" for a key that is no tenant's).
    tenant_id: str
    stream: bool
    # HTTP status; 0 when no status arrived.
    status: int
    # The error body's or the terminal SSE error event's code.
    error_code: str = ""
    # Completion tokens the client received (content chunks of a stream, the
    # usage of a whole answer).
    tokens_seen: int = 0
    max_tokens: int = 0
    # The client left before the end (on purpose).
    cut: bool = False
    started_at_s: float = 0.0
    ended_at_s: float = 0.0


class TruthLine(msgspec.Struct, kw_only=True):
    """loadtests/simulator/truth_log.py's line: the later line of a
    (replica, request id) supersedes the earlier."""

    replica_id: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


class BilledRow(msgspec.Struct, kw_only=True):
    request_id: str
    tenant_id: str
    replica_id: str
    prompt_tokens: int
    completion_tokens: int
    status: int = 0
    error_code: str = ""


class OpenCharge(msgspec.Struct, kw_only=True):
    tenant_id: str
    charge_id: str
    lease: bool


class Violation(msgspec.Struct, kw_only=True):
    check: str
    request_id: str
    detail: str


class Allowances(msgspec.Struct, frozen=True, kw_only=True):
    """Known deviations of requests whose client left or whose replica died,
    not reported as violations."""

    # Completion tokens a request whose client left may be billed under the
    # replica's count.
    abort_gap_tokens: int = 0
    # Such a request with no completion token billed may have its prompt
    # billed at the ingress's estimate.
    prompt_estimate: bool = False
    # Completion tokens a request whose replica died mid-answer may be billed
    # under the replica's count.
    death_gap_tokens: int = 0


STRICT = Allowances()


class Report(msgspec.Struct, kw_only=True):
    violations: list[Violation]
    stats: dict[str, int | float]

    @property
    def ok(self) -> bool:
        return not self.violations


def pre_upstream(entry: HistoryEntry) -> bool:
    """Refused by the ingress before any replica was asked."""
    if entry.status == 0 or entry.status == 200:
        return False
    return entry.error_code in PRE_UPSTREAM_CODES or (400 <= entry.status < 500
                                                      and entry.status != 499)


def fold_truth(lines: Iterable[TruthLine]) -> dict[tuple[str, str], TruthLine]:
    """The last word per (replica id, request id)."""
    return {(line.replica_id, line.request_id): line for line in lines}


def audit(history: Sequence[HistoryEntry], truth_lines: Iterable[TruthLine],
          rows: Sequence[BilledRow], open_charges: Sequence[OpenCharge],
          allow: Allowances = STRICT) -> Report:
    truth = fold_truth(truth_lines)
    truth_by_id: dict[str, list[TruthLine]] = defaultdict(list)
    for line in truth.values():
        truth_by_id[line.request_id].append(line)
    rows_by_id: dict[str, list[BilledRow]] = defaultdict(list)
    for row in rows:
        rows_by_id[row.request_id].append(row)
    by_id = {h.request_id: h for h in history if h.request_id}
    found: list[Violation] = []
    stats: dict[str, int | float] = {}
    found += _billed_once(history, rows_by_id)
    found += _rejected_unbilled(history, rows_by_id, truth_by_id)
    found += _matches_truth(rows_by_id, truth, by_id, stats, allow)
    found += _tenant_isolation(history, rows_by_id, by_id)
    found += [Violation(check="e", request_id=c.charge_id,
                        detail=f"reservation of tenant {c.tenant_id} still open")
              for c in open_charges if not c.lease]
    stats.update(_summary(history, rows, rows_by_id, truth, open_charges))
    return Report(violations=found, stats=stats)


def _final_rows(rows: Sequence[BilledRow]) -> list[BilledRow]:
    """What FINAL leaves: one row per (tenant_id, request_id)."""
    return list({(r.tenant_id, r.request_id): r for r in rows}.values())


def _billed_once(history: Sequence[HistoryEntry],
                 rows_by_id: dict[str, list[BilledRow]]) -> list[Violation]:
    found = []
    for entry in history:
        if not entry.request_id or not (entry.status == 200 or entry.tokens_seen >= 1):
            continue
        final = len(_final_rows(rows_by_id.get(entry.request_id, [])))
        if final != 1:
            found.append(Violation(
                check="a", request_id=entry.request_id,
                detail=f"{final} billed rows for a request with status {entry.status}"
                       f" and {entry.tokens_seen} tokens seen (cut: {entry.cut})"))
    return found


def _rejected_unbilled(history: Sequence[HistoryEntry], rows_by_id: dict[str, list[BilledRow]],
                       truth_by_id: dict[str, list[TruthLine]]) -> list[Violation]:
    found = []
    for entry in history:
        if not entry.request_id or not pre_upstream(entry):
            continue
        rows = len(rows_by_id.get(entry.request_id, []))
        reached = len(truth_by_id.get(entry.request_id, []))
        if rows or reached:
            found.append(Violation(
                check="b", request_id=entry.request_id,
                detail=f"refused before upstream ({entry.status} {entry.error_code}) yet"
                       f" {rows} billed rows, {reached} replicas saw it"))
    return found


def _matches_truth(rows_by_id: dict[str, list[BilledRow]],
                   truth: dict[tuple[str, str], TruthLine], by_id: dict[str, HistoryEntry],
                   stats: dict[str, int | float], allow: Allowances) -> list[Violation]:
    found = []
    under: list[int] = []
    gaps: dict[str, list[int]] = {"abort_gap": [], "death_gap": []}
    estimated: list[int] = []
    for request_id, rows in rows_by_id.items():
        entry = by_id.get(request_id)
        for row in _final_rows(rows):
            line = truth.get((row.replica_id, request_id))
            if line is None:
                found.append(Violation(check="c", request_id=request_id,
                                       detail=f"billed on {row.replica_id}, which has no"
                                              " ground truth of it"))
                continue
            if (row.prompt_tokens, row.completion_tokens) != (line.prompt_tokens,
                                                               line.completion_tokens):
                gap = line.completion_tokens - row.completion_tokens
                known = _known(row, line, allow)
                if known in ("abort_gap", "death_gap"):
                    gaps[known].append(gap)
                    continue
                if known == "prompt_estimate":
                    estimated.append(line.prompt_tokens - row.prompt_tokens)
                    continue
                if gap > 0:
                    under.append(gap)
                found.append(Violation(
                    check="c", request_id=request_id,
                    detail=f"billed {row.prompt_tokens}+{row.completion_tokens} tokens,"
                           f" replica {row.replica_id} generated {line.prompt_tokens}"
                           f"+{line.completion_tokens} ({line.finish_reason};"
                           f" {_outcome(entry)})"))
            if entry is not None and entry.max_tokens and (
                    row.completion_tokens > entry.max_tokens):
                found.append(Violation(
                    check="c", request_id=request_id,
                    detail=f"billed {row.completion_tokens} completion tokens over"
                           f" max_tokens {entry.max_tokens}"))
    stats["prompt_estimate_requests"] = len(estimated)
    stats["prompt_estimate_under_tokens"] = sum(estimated)
    for known, known_gaps in gaps.items():
        stats[f"{known}_requests"] = len(known_gaps)
        stats[f"{known}_tokens"] = sum(known_gaps)
        stats[f"{known}_max_tokens"] = max(known_gaps, default=0)
    stats["under_billed_requests"] = len(under)
    stats["under_billed_tokens"] = sum(under)
    stats["under_billed_max_tokens"] = max(under, default=0)
    return found


def _known(row: BilledRow, line: TruthLine, allow: Allowances) -> str:
    """Which allowed deviation a mismatched row is ("" for none)."""
    gap = line.completion_tokens - row.completion_tokens
    if (row.error_code == UPSTREAM_FAILED and line.finish_reason is None
            and row.prompt_tokens == line.prompt_tokens and 0 < gap <= allow.death_gap_tokens):
        return "death_gap"
    if row.status != CLIENT_CLOSED or not 0 <= gap <= allow.abort_gap_tokens:
        return ""
    if row.prompt_tokens == line.prompt_tokens:
        return "abort_gap" if gap > 0 else ""
    if allow.prompt_estimate and row.completion_tokens == 0:
        return "prompt_estimate"
    return ""


def _outcome(entry: HistoryEntry | None) -> str:
    if entry is None:
        return "not in the history"
    kind = "stream" if entry.stream else "whole answer"
    cut = ", client left" if entry.cut else ""
    code = f" {entry.error_code}" if entry.error_code else ""
    return f"{kind} {entry.status}{code}, client saw {entry.tokens_seen}{cut}"


def _tenant_isolation(history: Sequence[HistoryEntry], rows_by_id: dict[str, list[BilledRow]],
                      by_id: dict[str, HistoryEntry]) -> list[Violation]:
    found = []
    # Requests whose id the client never learnt, per tenant: rows of unknown
    # ids are theirs, at most one each.
    unseen = Counter(h.tenant_id for h in history if not h.request_id)
    for request_id, rows in sorted(rows_by_id.items()):
        entry = by_id.get(request_id)
        for row in _final_rows(rows):
            if entry is not None:
                if row.tenant_id != entry.tenant_id:
                    found.append(Violation(
                        check="d", request_id=request_id,
                        detail=f"billed to {row.tenant_id!r}, sent with a key of"
                               f" {entry.tenant_id!r}"))
            elif unseen[row.tenant_id] > 0:
                unseen[row.tenant_id] -= 1
            else:
                found.append(Violation(
                    check="d", request_id=request_id,
                    detail=f"billed to {row.tenant_id!r}; no such request in the history"))
    return found


def _summary(history: Sequence[HistoryEntry], rows: Sequence[BilledRow],
             rows_by_id: dict[str, list[BilledRow]], truth: dict[tuple[str, str], TruthLine],
             open_charges: Sequence[OpenCharge]) -> dict[str, int | float]:
    final = sum(len(_final_rows(r)) for r in rows_by_id.values())
    statuses = Counter(h.status for h in history)
    return {
        "requests": len(history),
        "requests_200": statuses[200],
        "requests_streamed_cut": sum(1 for h in history if h.cut),
        "requests_refused_before_upstream": sum(1 for h in history if pre_upstream(h)),
        "requests_without_id": sum(1 for h in history if not h.request_id),
        "requests_failed_after_upstream": sum(
            1 for h in history if h.status >= 500 and not pre_upstream(h)) + sum(
            1 for h in history if h.status == 200 and h.error_code),
        "tokens_seen_by_clients": sum(h.tokens_seen for h in history),
        "rows_raw": len(rows),
        "rows_final": final,
        "rows_raw_duplicates": len(rows) - final,
        "truth_requests": len(truth),
        # Generated on a replica that did not serve the request in the end
        # (an attempt that failed before the first byte, retried elsewhere).
        "unbilled_attempt_tokens": sum(
            t.completion_tokens for (replica, request_id), t in truth.items()
            if request_id in rows_by_id
            and all(r.replica_id != replica for r in rows_by_id[request_id])),
        "truth_completion_tokens": sum(t.completion_tokens for t in truth.values()),
        "billed_completion_tokens": sum(r.completion_tokens for rs in rows_by_id.values()
                                        for r in _final_rows(rs)),
        "open_leases": sum(1 for c in open_charges if c.lease),
    }


def render(report: Report) -> str:
    """A human report: the figures, then each check's violations."""
    lines = ["T31 billing audit: " + ("OK" if report.ok else
                                      f"{len(report.violations)} violations")]
    lines += [f"  {name}: {value}" for name, value in report.stats.items()]
    by_check: dict[str, list[Violation]] = defaultdict(list)
    for violation in report.violations:
        by_check[violation.check].append(violation)
    for check in sorted(by_check):
        found = by_check[check]
        lines.append(f"({check}) {len(found)} violations")
        lines += [f"    {v.request_id}: {v.detail}" for v in found[:MAX_SHOWN_PER_CHECK]]
        if len(found) > MAX_SHOWN_PER_CHECK:
            lines.append(f"    ... and {len(found) - MAX_SHOWN_PER_CHECK} more")
    return "\n".join(lines)
