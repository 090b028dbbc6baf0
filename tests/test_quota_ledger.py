"""The quota ledger (pure): table-driven units with an injected clock, and a
hypothesis property test of its limits."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.quota_ledger import OpenRequest, TenantLedger
from scheduler.quota_terms import (
    Estimate,
    LeaseSizing,
    RateLimitNumbers,
    estimate,
    openai_duration,
    period_bounds,
    shard_of,
)
from scheduler.tenancy import Price, TenantLimits

# 2025-01-15 12:00:00 UTC.
NOON_S = 1_736_942_400.0
PRICE = Price(effective_from_s=0, input_nusd_per_token=1_000, cached_input_nusd_per_token=100,
              output_nusd_per_token=2_000)
SIZING = LeaseSizing(ttl_s=2.0, share=0.1, min_requests=2, max_requests=100,
                     max_tokens=100_000, max_nusd=10**9, return_grace_s=5.0)


def est(tokens: int = 10, cost_nusd: int | None = 0) -> Estimate:
    return Estimate(tokens=tokens, cost_nusd=cost_nusd)


@pytest.mark.parametrize(("limits", "prompt", "max_tokens", "tokens", "cost"), [
    (TenantLimits(), 100, 50, 150, 100 * 1_000 + 50 * 2_000),
    (TenantLimits(max_tokens_cap=20), 100, 50, 120, 100 * 1_000 + 20 * 2_000),
    (TenantLimits(max_tokens_cap=20), 100, 5, 105, 100 * 1_000 + 5 * 2_000),
])
def test_estimates_clamp_max_tokens_and_price_the_prompt_uncached(
        limits: TenantLimits, prompt: int, max_tokens: int, tokens: int, cost: int) -> None:
    assert estimate(limits, PRICE, prompt, max_tokens) == Estimate(tokens=tokens, cost_nusd=cost)
    assert estimate(limits, None, prompt, max_tokens).cost_nusd is None


@pytest.mark.parametrize(("now_s", "period", "name", "next_s"), [
    (NOON_S, "day", "2025-01-15", NOON_S + 12 * 3600),
    (NOON_S, "month", "2025-01", 1_738_368_000.0),       # 2025-02-01
    (1_733_011_200.0, "month", "2024-12", 1_735_689_600.0),  # December rolls the year
])
def test_budget_periods_are_utc_calendar_periods(now_s: float, period: str, name: str,
                                                 next_s: float) -> None:
    assert period_bounds(now_s, period) == (name, next_s)  # type: ignore[arg-type]


def test_requests_per_minute_hold_over_any_window_and_say_when_to_retry() -> None:
    ledger, limits = TenantLedger(), TenantLimits(requests_per_minute=3)
    for i, at_s in enumerate((0.0, 10.0, 20.0)):
        assert ledger.reserve(f"r{i}", est(), limits, NOON_S + at_s).admitted
    refused = ledger.reserve("r3", est(), limits, NOON_S + 30.0)
    assert (refused.refusal, refused.retry_after_s) == ("requests", 30.0)
    assert refused.numbers.remaining_requests == 0
    # At exactly 60 s after the first admission, it has left the window.
    assert not ledger.reserve("r3", est(), limits, NOON_S + 59.9).admitted
    assert ledger.reserve("r3", est(), limits, NOON_S + 60.0).admitted


@pytest.mark.parametrize(("limits", "estimates", "refusal"), [
    (TenantLimits(tokens_per_minute=100), [60, 60], "tokens"),
    (TenantLimits(tokens_per_minute=100), [101], "too_large"),
    (TenantLimits(max_concurrent_requests=1), [1, 1], "concurrency"),
    (TenantLimits(budget_nusd=100), [(1, 60), (1, 60)], "budget"),
    (TenantLimits(budget_nusd=100), [(1, None)], "unpriced"),
])
def test_each_limit_refuses_with_its_name(limits: TenantLimits, estimates: list,
                                          refusal: str) -> None:
    ledger = TenantLedger()
    verdicts = [ledger.reserve(f"r{i}", est(*e) if isinstance(e, tuple) else est(e), limits,
                               NOON_S) for i, e in enumerate(estimates)]
    assert [v.refusal for v in verdicts] == [""] * (len(estimates) - 1) + [refusal]


def test_an_unpriced_model_is_admitted_at_no_cost_without_a_budget() -> None:
    verdict = TenantLedger().reserve("r", est(cost_nusd=None), TenantLimits(), NOON_S)
    assert verdict.admitted and verdict.cost_nusd == 0


def test_commit_counts_true_tokens_and_spend_and_frees_the_rest() -> None:
    ledger = TenantLedger()
    limits = TenantLimits(tokens_per_minute=100, max_concurrent_requests=2, budget_nusd=1_000,
                          budget_period="day")
    assert ledger.reserve("a", est(80, 800), limits, NOON_S).admitted
    assert ledger.reserve("b", est(80, 100), limits, NOON_S).refusal == "tokens"
    assert ledger.commit("a", 30, 300, NOON_S + 1)
    assert (ledger.window_tokens, ledger.meta.spent_nusd, ledger.reserved_nusd,
            ledger.in_use) == (30, 300, 0, 0)
    assert ledger.reserve("b", est(70, 700), limits, NOON_S + 2).admitted
    # Spend held by a reservation in flight may clear soon; spent money not before the period ends.
    held = ledger.reserve("c", est(0, 1), limits, NOON_S + 2)
    assert (held.refusal, held.retry_after_s) == ("budget", 1.0)
    assert ledger.release("b", NOON_S + 3) and ledger.reserved_nusd == 0
    exhausted = ledger.reserve("c", est(0, 701), limits, NOON_S + 3)
    assert (exhausted.refusal, exhausted.retry_after_s) == ("budget", 12 * 3600 - 3.0)


def test_budget_held_by_reservations_in_flight_says_retry_soon() -> None:
    ledger, limits = TenantLedger(retry_after_s=1.5), TenantLimits(budget_nusd=1_000)
    assert ledger.reserve("a", est(1, 900), limits, NOON_S).admitted
    verdict = ledger.reserve("b", est(1, 200), limits, NOON_S)
    assert (verdict.refusal, verdict.retry_after_s) == ("budget", 1.5)


def test_a_new_period_starts_with_nothing_spent() -> None:
    ledger, limits = TenantLedger(), TenantLimits(budget_nusd=1_000, budget_period="day")
    assert ledger.reserve("a", est(1, 1_000), limits, NOON_S).admitted
    assert ledger.commit("a", 1, 1_000, NOON_S)
    assert ledger.reserve("b", est(1, 1), limits, NOON_S + 3600).refusal == "budget"
    assert ledger.reserve("b", est(1, 1), limits, NOON_S + 12 * 3600).admitted


def test_retried_calls_never_count_twice() -> None:
    ledger, limits = TenantLedger(), TenantLimits(requests_per_minute=10, budget_nusd=10_000)
    first = ledger.reserve("a", est(5, 500), limits, NOON_S)
    again = ledger.reserve("a", est(5, 500), limits, NOON_S + 0.1)
    assert (again.admitted, again.cost_nusd) == (first.admitted, first.cost_nusd) == (True, 500)
    assert ledger.commit("a", 5, 400, NOON_S + 1)
    assert not ledger.commit("a", 5, 400, NOON_S + 1.1)
    assert not ledger.release("a", NOON_S + 1.2)
    # A reserve retried after its commit (a late duplicate) admits nothing new.
    assert ledger.reserve("a", est(5, 500), limits, NOON_S + 2).admitted
    assert (ledger.window_requests, ledger.meta.spent_nusd, ledger.reserved_nusd) == (1, 400, 0)


@pytest.mark.parametrize(("limits", "expected"), [
    (TenantLimits(), (None, None, None, None)),
    (TenantLimits(requests_per_minute=100), (10, None, None, None)),
    (TenantLimits(requests_per_minute=2_000, tokens_per_minute=10_000,
                  max_concurrent_requests=50, budget_nusd=10**6), (100, 1_000, 10**5, 5)),
    # Below min_requests requests like this one: no lease, reserve per request.
    (TenantLimits(requests_per_minute=19), None),
    (TenantLimits(tokens_per_minute=150), None),
    (TenantLimits(max_concurrent_requests=10), None),
])
def test_leases_are_a_share_of_what_remains(limits: TenantLimits, expected: tuple | None) -> None:
    granted = TenantLedger().grant_lease("l", est(10, 10), limits, SIZING, NOON_S)
    got = None if granted is None else (granted.requests, granted.tokens, granted.nusd,
                                        granted.concurrent)
    assert got == expected


def test_leases_shrink_near_the_limit_down_to_none() -> None:
    ledger, limits = TenantLedger(), TenantLimits(requests_per_minute=100)
    sizes = []
    while (lease := ledger.grant_lease(f"l{len(sizes)}", est(), limits, SIZING, NOON_S)):
        sizes.append(lease.requests)
    # A tenth of what remains each time, while that covers two requests.
    assert sizes == [10, 9, 8, 7, 6, 6, 5, 4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2]
    assert ledger.window_requests == sum(sizes) == 82
    assert ledger.reserve("r", est(), limits, NOON_S).admitted


def test_a_returned_lease_gives_back_what_it_did_not_use() -> None:
    ledger = TenantLedger()
    limits = TenantLimits(requests_per_minute=1_000, tokens_per_minute=100_000,
                          max_concurrent_requests=100, budget_nusd=10**7)
    lease = ledger.grant_lease("l", est(100, 1_000), limits, SIZING, NOON_S)
    assert lease is not None and (lease.requests, lease.concurrent, lease.nusd) == (
        100, 10, 10**6)
    assert (ledger.window_requests, ledger.in_use, ledger.reserved_nusd) == (100, 10, 10**6)
    assert ledger.return_lease("l", 3, 250, 2_500, [OpenRequest("x", 100, 1_000)], NOON_S + 1)
    assert not ledger.return_lease("l", 3, 250, 2_500, [], NOON_S + 1.1)
    assert (ledger.window_requests, ledger.window_tokens, ledger.in_use, ledger.reserved_nusd,
            ledger.meta.spent_nusd) == (3, 350, 1, 1_000, 2_500)
    # The request still running became a reservation of its own.
    assert ledger.commit("x", 90, 900, NOON_S + 2)
    assert (ledger.window_tokens, ledger.in_use, ledger.meta.spent_nusd) == (340, 0, 3_400)


def test_a_lease_never_returned_is_settled_as_fully_used() -> None:
    ledger, limits = TenantLedger(return_grace_s=5.0), TenantLimits(budget_nusd=10**7)
    lease = ledger.grant_lease("l", est(10, 1_000), limits, SIZING, NOON_S)
    assert lease is not None and lease.nusd == 10**6
    ledger.advance(NOON_S + 6.9, limits)
    assert ledger.reserved_nusd == 10**6
    ledger.advance(NOON_S + 7.1, limits)
    assert (ledger.reserved_nusd, ledger.meta.spent_nusd) == (0, 10**6)
    assert not ledger.return_lease("l", 0, 0, 0, [], NOON_S + 8)


def test_settled_ids_are_forgotten_after_the_window_and_the_memory() -> None:
    ledger, limits = TenantLedger(), TenantLimits()
    ledger.reserve("a", est(), limits, NOON_S)
    ledger.commit("a", 1, 0, NOON_S + 30)
    ledger.advance(NOON_S + 89, limits)
    assert "a" in ledger.charges
    ledger.advance(NOON_S + 90, limits)
    assert "a" not in ledger.charges
    assert ledger.take_changes() == {"c:a": None, "meta": msgspec.json.encode(ledger.meta)}


def test_restored_ledger_equals_the_saved_one() -> None:
    ledger = TenantLedger()
    limits = TenantLimits(requests_per_minute=50, tokens_per_minute=5_000,
                          max_concurrent_requests=20, budget_nusd=10**6)
    saved: dict[str, bytes] = {}

    def save() -> None:
        for field, value in ledger.take_changes().items():
            if value is None:
                saved.pop(field, None)
            else:
                saved[field] = value

    ledger.reserve("a", est(100, 1_000), limits, NOON_S)
    ledger.grant_lease("l", est(100, 1_000), limits, SIZING, NOON_S + 1)
    save()
    ledger.commit("a", 40, 400, NOON_S + 2)
    ledger.reserve("b", est(100, 1_000), limits, NOON_S + 3)
    save()
    back = TenantLedger.restore(saved, NOON_S + 3)
    assert back.charges == ledger.charges and back.meta == ledger.meta
    for name in ("window_requests", "window_tokens", "in_use", "reserved_nusd"):
        assert getattr(back, name) == getattr(ledger, name), name
    assert back.reserve("a", est(100, 1_000), limits, NOON_S + 4) == ledger.reserve(
        "a", est(100, 1_000), limits, NOON_S + 4)


def test_rate_limit_numbers_become_openai_headers() -> None:
    numbers = RateLimitNumbers(limit_requests=100, remaining_requests=7, limit_tokens=0,
                               reset_requests_s=1.5)
    assert numbers.headers() == {"x-ratelimit-limit-requests": "100",
                                 "x-ratelimit-remaining-requests": "7",
                                 "x-ratelimit-reset-requests": "1.5s"}


@pytest.mark.parametrize(("seconds", "written"), [
    (0.0, "0ms"), (0.0004, "1ms"), (0.02, "20ms"), (0.999, "999ms"), (1.0, "1s"),
    (1.5, "1.5s"), (59.9991, "1m0s"), (360.0, "6m0s"), (61.25, "1m1.25s"),
    (3600.0, "1h0m0s"), (86_399.0, "23h59m59s"),
])
def test_resets_are_written_as_openai_durations(seconds: float, written: str) -> None:
    assert openai_duration(seconds) == written


def test_a_reservation_never_settled_is_spent_in_full_after_its_ttl() -> None:
    ledger, limits = TenantLedger(reservation_ttl_s=100.0), TenantLimits(budget_nusd=1_000)
    assert ledger.reserve("a", est(1, 600), limits, NOON_S).admitted
    ledger.advance(NOON_S + 100, limits)
    assert (ledger.reserved_nusd, ledger.in_use) == (600, 1)
    ledger.advance(NOON_S + 100.1, limits)
    assert (ledger.reserved_nusd, ledger.in_use, ledger.meta.spent_nusd) == (0, 0, 600)
    assert not ledger.commit("a", 1, 10, NOON_S + 101)


@pytest.mark.parametrize("shards", [1, 2, 7])
def test_tenants_spread_over_shards_alike_everywhere(shards: int) -> None:
    owners = [shard_of(f"t-{i}", shards) for i in range(200)]
    assert owners == [shard_of(f"t-{i}", shards) for i in range(200)]
    assert set(owners) == set(range(shards))
