"""What an ingress decides alone while a quota shard is away (pure,
scheduler/quota_outage.py), and what the ledger does with state it never saw
(a shard whose Redis lost its ledgers): table-driven, with an injected clock."""

from __future__ import annotations

import pytest

from scheduler.quota_ledger import OpenRequest, TenantLedger
from scheduler.quota_outage import LocalWindow, ShardBreaker, local_share, local_verdict
from scheduler.quota_terms import Estimate
from scheduler.tenancy import TenantLimits

NOON_S = 1_736_942_400.0


def test_the_breaker_fails_fast_then_lets_one_probe_through() -> None:
    breaker = ShardBreaker(open_s=0.5)
    assert not breaker.open and not breaker.take_probe(0.0)
    assert breaker.failed(10.0)  # closed until now: the caller logs the transition
    assert breaker.open and not breaker.failed(10.1)  # already open: no second log
    assert not breaker.take_probe(10.5)  # reopened at 10.1: due at 10.6
    assert breaker.take_probe(10.6)
    assert not breaker.take_probe(10.7), "a second probe while the first is out"
    breaker.failed(10.8)  # the probe failed: open for another open_s
    assert not breaker.take_probe(11.2) and breaker.take_probe(11.3)
    assert breaker.succeeded() and not breaker.open
    assert not breaker.succeeded(), "closing a closed breaker is no transition"


@pytest.mark.parametrize(("limit", "ingresses", "share"), [
    (100, 1, 100), (100, 2, 50), (101, 2, 50), (5, 8, 0), (0, 4, 0)])
def test_each_ingress_gets_its_whole_share_never_more(limit: int, ingresses: int,
                                                      share: int) -> None:
    assert local_share(limit, ingresses) == share
    assert share * ingresses <= limit


def test_the_window_counts_the_last_minute_in_seconds() -> None:
    window = LocalWindow()
    window.note(NOON_S + 0.2, 1, 10)
    window.note(NOON_S + 0.9, 1, 20)
    window.note(NOON_S + 30.5, 2, 5)
    assert window.totals(NOON_S + 31) == (4, 35)
    # The first second's slot leaves once all of it is over 60 s old.
    assert window.totals(NOON_S + 60.9) == (4, 35)
    assert window.totals(NOON_S + 61.0) == (2, 5)
    assert window.frees_in_s(NOON_S + 61.0) == pytest.approx(30.0)
    assert window.totals(NOON_S + 200) == (0, 0) and window.frees_in_s(NOON_S + 200) == 0.0


@pytest.mark.parametrize(("limits", "used", "open_here", "tokens", "refusal"), [
    (TenantLimits(), (0, 0), 0, 10, ""),
    (TenantLimits(requests_per_minute=100), (49, 0), 0, 10, ""),
    (TenantLimits(requests_per_minute=100), (50, 0), 0, 10, "requests"),
    (TenantLimits(tokens_per_minute=1_000), (1, 490), 0, 10, ""),
    (TenantLimits(tokens_per_minute=1_000), (1, 491), 0, 10, "tokens"),
    (TenantLimits(tokens_per_minute=1_000), (0, 0), 0, 501, "too_large"),
    (TenantLimits(max_concurrent_requests=4), (0, 0), 1, 10, ""),
    (TenantLimits(max_concurrent_requests=4), (0, 0), 2, 10, "concurrency"),
    (TenantLimits(max_concurrent_requests=1), (0, 0), 0, 10, "concurrency"),
])
def test_the_local_bucket_admits_half_of_each_limit_on_two_ingresses(
        limits: TenantLimits, used: tuple[int, int], open_here: int, tokens: int,
        refusal: str) -> None:
    window = LocalWindow()
    if used[0]:
        window.note(NOON_S - 10, *used)
    verdict = local_verdict(limits, 2, window, open_here, tokens, NOON_S, retry_after_s=1.0)
    assert verdict.refusal == refusal
    if refusal in ("requests", "tokens"):
        assert verdict.retry_after_s == 51  # the noted second leaves the window then
    if refusal == "concurrency":
        assert verdict.retry_after_s == 1.0
    assert verdict.numbers.limit_requests == limits.requests_per_minute


def test_the_local_bucket_never_admits_more_than_its_share_in_any_minute() -> None:
    limits, window, admitted = TenantLimits(requests_per_minute=60), LocalWindow(), []
    for tick in range(0, 1800):  # 3 minutes, 10 attempts a second
        now_s = NOON_S + tick / 10
        if local_verdict(limits, 3, window, 0, 1, now_s, 1.0).admitted:
            window.note(now_s, 1, 1)
            admitted.append(now_s)
    for i, start_s in enumerate(admitted):
        assert sum(1 for t in admitted[i:] if t < start_s + 60) <= 20
    assert len(admitted) >= 40  # and it does admit again as the window moves


def test_a_commit_the_ledger_never_saw_still_counts_once() -> None:
    ledger, limits = TenantLedger(), TenantLimits(requests_per_minute=10, budget_nusd=10**6)
    ledger.advance(NOON_S, limits)  # as the shard does before every call
    assert ledger.commit("lost", 50, 700, NOON_S)
    assert not ledger.commit("lost", 50, 700, NOON_S + 1)
    assert (ledger.meta.spent_nusd, ledger.window_requests, ledger.window_tokens) == (700, 1, 50)
    assert (ledger.reserved_nusd, ledger.in_use) == (0, 0)
    ledger.advance(NOON_S + 2, limits)
    assert ledger.meta.spent_nusd == 700


def test_a_lease_the_ledger_never_granted_counts_what_it_used_once() -> None:
    # Granted before the shard's Redis lost it, or an ingress's tab of local admissions.
    ledger = TenantLedger()
    assert ledger.return_lease("outage-1", 7, 300, 900, [OpenRequest("run", 40, 100)], NOON_S)
    assert not ledger.return_lease("outage-1", 7, 300, 900, [], NOON_S + 0.5)
    assert (ledger.window_requests, ledger.window_tokens, ledger.meta.spent_nusd) == (7, 340, 900)
    assert (ledger.in_use, ledger.reserved_nusd) == (1, 100)
    assert ledger.commit("run", 30, 80, NOON_S + 1)
    assert (ledger.window_tokens, ledger.in_use, ledger.meta.spent_nusd) == (330, 0, 980)


def test_a_snapshot_restores_the_whole_ledger_and_the_truth_only_raises_spend() -> None:
    ledger, limits = TenantLedger(), TenantLimits(budget_nusd=10**6)
    ledger.reserve("a", Estimate(tokens=10, cost_nusd=500), limits, NOON_S)
    ledger.commit("a", 10, 400, NOON_S + 1)
    ledger.reserve("b", Estimate(tokens=10, cost_nusd=500), limits, NOON_S + 2)
    ledger.take_changes()
    ledger.spent_at_least(300)  # lower than what the ledger counted: kept
    assert ledger.meta.spent_nusd == 400 and ledger.take_changes() == {}
    ledger.spent_at_least(2_000)
    fields = ledger.snapshot()
    assert ledger.take_changes() == {}
    again = TenantLedger.restore(fields, NOON_S + 3)
    assert (again.meta, again.charges) == (ledger.meta, ledger.charges)
    assert (again.reserved_nusd, again.window_requests) == (500, 2)


def test_negative_control_a_ledger_trusting_an_empty_redis_overspends() -> None:
    # A budget of 10 requests' worth, spent in full before the Redis was lost.
    limits, cost = TenantLimits(budget_nusd=10_000), Estimate(tokens=10, cost_nusd=1_000)
    billed_nusd = 10_000
    trusting = TenantLedger.restore({}, NOON_S)  # what an empty Redis holds
    trusting.advance(NOON_S, limits)
    assert trusting.reserve("r", cost, limits, NOON_S).admitted, "the control must overspend"
    careful = TenantLedger.restore({}, NOON_S)
    careful.advance(NOON_S, limits)
    careful.spent_at_least(billed_nusd)  # what the shard does before admitting
    assert careful.reserve("r", cost, limits, NOON_S).refusal == "budget"
