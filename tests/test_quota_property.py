"""Property test of the quota ledger with an injected clock: random requests,
commits, releases, leases (used in part, returned or abandoned) and clock
jumps. In any 60 s window the admitted requests and tokens stay within the
limits (a lease counts over its whole life); spent + reserved never exceeds
the budget; a refused call changes nothing, and waiting its Retry-After
clears that refusal; retried calls never count twice."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.quota_ledger import OpenRequest, TenantLedger
from scheduler.quota_terms import WINDOW_S, LeaseSizing, estimate
from scheduler.tenancy import Price, TenantLimits

START_S = 1_736_942_400.0  # noon UTC: the runs stay inside one budget day
PRICE = Price(effective_from_s=0, input_nusd_per_token=10, cached_input_nusd_per_token=1,
              output_nusd_per_token=10)
SIZING = LeaseSizing(ttl_s=5.0, share=0.3, min_requests=2, max_requests=10, max_tokens=400,
                     max_nusd=4_000, return_grace_s=3.0)

limits_st = st.builds(TenantLimits, requests_per_minute=st.integers(1, 20),
                      tokens_per_minute=st.integers(50, 600),
                      max_concurrent_requests=st.integers(1, 20),
                      # Sometimes too large to bind, so the rate limits are pushed.
                      budget_nusd=st.one_of(st.integers(500, 20_000), st.just(10**8)),
                      budget_period=st.just("day"),
                      max_tokens_cap=st.integers(0, 60))
_reserve_st = st.tuples(st.just("reserve"), st.integers(0, 80), st.integers(0, 80))
ops_st = st.lists(st.one_of(
    # Jumps near the window's length too, where a miscounted edge would show.
    st.tuples(st.just("tick"), st.one_of(st.floats(0, 45), st.sampled_from([57.0, 59.9, 60.0]))),
    # Reserves weigh more: limits are only tested when they are reached.
    _reserve_st, _reserve_st, _reserve_st,
    st.tuples(st.just("commit"), st.integers(0, 1_000), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 1_000)),
    st.tuples(st.just("lease"), st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.just("return"), st.integers(0, 1_000), st.floats(0, 1), st.integers(0, 3)),
    st.tuples(st.just("retry"), st.integers(0, 1_000)),
), min_size=20, max_size=120)


def _state(ledger: TenantLedger) -> bytes:
    return msgspec.json.encode([ledger.charges, ledger.meta, ledger.window_requests,
                                ledger.window_tokens, ledger.in_use, ledger.reserved_nusd])


def _copy(ledger: TenantLedger, now_s: float) -> TenantLedger:
    fields = {"c:" + k: msgspec.json.encode(v) for k, v in ledger.charges.items()}
    fields["meta"] = msgspec.json.encode(ledger.meta)
    return TenantLedger.restore(fields, now_s, return_grace_s=SIZING.return_grace_s)


class Run:
    def __init__(self, limits: TenantLimits) -> None:
        self.limits = limits
        self.ledger = TenantLedger(return_grace_s=SIZING.return_grace_s)
        self.now_s = START_S
        # What was admitted, as the test sees it: id -> [from_s, until_s, requests, tokens].
        self.admitted: dict[str, list[float]] = {}
        self.open: dict[str, tuple[int, int]] = {}  # request id -> (tokens, cost) reserved
        self.leases: dict[str, tuple[float, object]] = {}
        self.spent_nusd = 0
        self.done: list[tuple] = []  # calls whose retry must change nothing

    def reserve(self, prompt: int, max_tokens: int) -> None:
        request_id = f"r{len(self.admitted)}-{len(self.done)}"
        est = estimate(self.limits, PRICE, prompt, max_tokens)
        self.ledger.advance(self.now_s, self.limits)
        before = _state(self.ledger)
        verdict = self.ledger.reserve(request_id, est, self.limits, self.now_s)
        if not verdict.admitted:
            assert _state(self.ledger) == before, "a refused reserve changed the ledger"
            if verdict.refusal in ("requests", "tokens"):
                assert verdict.retry_after_s is not None
                later = _copy(self.ledger, self.now_s)
                again = later.reserve(request_id, est, self.limits,
                                      self.now_s + verdict.retry_after_s)
                assert again.refusal != verdict.refusal
            return
        assert est.cost_nusd is not None
        self.admitted[request_id] = [self.now_s, self.now_s, 1, est.tokens]
        self.open[request_id] = (est.tokens, est.cost_nusd)
        self.done.append(("reserve", request_id, est, self.now_s))

    def commit(self, pick: int, fraction: float) -> None:
        if not self.open:
            return
        request_id = sorted(self.open)[pick % len(self.open)]
        tokens, cost = self.open.pop(request_id)
        true_tokens, true_cost = int(tokens * fraction), int(cost * fraction)
        assert self.ledger.commit(request_id, true_tokens, true_cost, self.now_s)
        self.admitted[request_id][3] = true_tokens
        self.spent_nusd += true_cost
        self.done.append(("commit", request_id, true_tokens, true_cost, self.now_s))

    def release(self, pick: int) -> None:
        if not self.open:
            return
        request_id = sorted(self.open)[pick % len(self.open)]
        del self.open[request_id]
        assert self.ledger.release(request_id, self.now_s)
        self.admitted[request_id][3] = 0
        self.done.append(("release", request_id, self.now_s))

    def lease(self, prompt: int, max_tokens: int) -> None:
        # Never an id used before: a settled one is remembered for a while.
        lease_id = f"l{len(self.admitted)}-{len(self.done)}"
        per_request = estimate(self.limits, PRICE, prompt, max_tokens)
        granted = self.ledger.grant_lease(lease_id, per_request, self.limits, SIZING, self.now_s)
        if granted is None:
            return
        self.leases[lease_id] = (self.now_s, granted)
        self.admitted[lease_id] = [self.now_s, self.now_s + SIZING.ttl_s,
                                   granted.requests or 0, granted.tokens or 0]

    def return_lease(self, pick: int, fraction: float, still_running: int) -> None:
        if not self.leases:
            return
        lease_id = sorted(self.leases)[pick % len(self.leases)]
        from_s, granted = self.leases.pop(lease_id)
        assert granted.requests is not None and granted.nusd is not None
        assert granted.tokens is not None and granted.concurrent is not None
        if self.now_s > from_s + SIZING.ttl_s + SIZING.return_grace_s:
            # Abandoned: the ledger settled it as fully used.
            self.spent_nusd += granted.nusd
            assert not self.ledger.return_lease(lease_id, 0, 0, 0, [], self.now_s)
            return
        used = int(granted.requests * fraction)
        running = min(still_running, used, granted.concurrent)
        per_tokens, per_cost = granted.tokens // max(1, used), granted.nusd // max(1, used)
        children = [OpenRequest(f"{lease_id}-{i}", per_tokens, per_cost) for i in range(running)]
        used_tokens = (used - running) * per_tokens
        spent = (used - running) * per_cost
        until_s = min(self.now_s, from_s + SIZING.ttl_s)
        assert self.ledger.return_lease(lease_id, used, used_tokens, spent, children, self.now_s)
        self.admitted[lease_id][1:] = [until_s, used, used_tokens]
        for child in children:
            self.admitted[child.request_id] = [from_s, until_s, 0, child.tokens]
            self.open[child.request_id] = (child.tokens, child.cost_nusd)
        self.spent_nusd += spent
        self.done.append(("return", lease_id, self.now_s))

    def retry(self, pick: int) -> None:
        recent = [c for c in self.done if c[-1] > self.now_s - WINDOW_S]
        if not recent:
            return
        call = recent[pick % len(recent)]
        self.ledger.advance(self.now_s, self.limits)
        before = _state(self.ledger)
        if call[0] == "reserve":
            assert self.ledger.reserve(call[1], call[2], self.limits, self.now_s).admitted
        elif call[0] == "commit":
            assert not self.ledger.commit(call[1], call[2], call[3], self.now_s)
        elif call[0] == "release":
            assert not self.ledger.release(call[1], self.now_s)
        else:
            assert not self.ledger.return_lease(call[1], 0, 0, 0, [], self.now_s)
        assert _state(self.ledger) == before, f"retried {call[0]} changed the ledger"

    def check(self) -> None:
        ledger, limits = self.ledger, self.limits
        assert ledger.meta.spent_nusd + ledger.reserved_nusd <= limits.budget_nusd
        assert ledger.in_use <= limits.max_concurrent_requests
        charges = list(self.admitted.values())
        for from_s, *_ in charges:
            # Every charge that could have been admitted within the 60 s
            # ending at `from_s` (the worst windows end at an admission).
            meeting = [c for c in charges if c[0] <= from_s and c[1] > from_s - WINDOW_S]
            assert sum(c[2] for c in meeting) <= limits.requests_per_minute
            assert sum(c[3] for c in meeting) <= limits.tokens_per_minute


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(limits=limits_st, ops=ops_st)
def test_limits_hold_in_every_window(limits: TenantLimits, ops: list[tuple]) -> None:
    run = Run(limits)
    for op, *args in ops:
        if op == "tick":
            run.now_s += args[0]
            run.ledger.advance(run.now_s, limits)
            # Leases the ledger settled as abandoned are no longer returnable.
            for lease_id in [i for i, (from_s, _) in run.leases.items()
                             if run.now_s > from_s + SIZING.ttl_s + SIZING.return_grace_s]:
                run.return_lease(sorted(run.leases).index(lease_id), 0, 0)
        elif op == "return":
            run.return_lease(*args)
        else:
            getattr(run, op)(*args)
        run.check()
    for lease_id in list(run.leases):
        run.return_lease(sorted(run.leases).index(lease_id), 1.0, 0)
    for request_id in list(run.open):
        run.commit(sorted(run.open).index(request_id), 1.0)
    assert (run.ledger.reserved_nusd, run.ledger.in_use) == (0, 0)
    assert run.ledger.meta.spent_nusd == run.spent_nusd
