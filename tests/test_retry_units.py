"""Unit tests of retries and ejection in the pure core: the retry budget,
ejection timing and re-admission, the exclusion filter, and re-placement of a
request whose replica failed it. Time passed in; rng seeded."""

from __future__ import annotations

import random

import pytest

from scheduler.config import EjectionConfig, decode_config
from scheduler.core import SchedulerCore
from scheduler.ejection import Ejections
from scheduler.filters import NotExcluded
from scheduler.framework import ReplicaId, ReplicaView, SchedRequest
from scheduler.retry_budget import RetryBudget
from scheduler.wire import (
    Placement,
    PlaceRequest,
    ReplicaFailed,
    ReplicaInfo,
    encode,
    place_request_decoder,
    replica_failed_decoder,
)

# --- retry budget ------------------------------------------------------------------

# Each step: ("req", now_s) counts a request; ("retry", now_s, allowed) asks for a
# retry; ("refund", now_s) takes one back.
BUDGET_CASES = {
    "the floor allows retries without traffic": [
        ("retry", 0.0, True), ("retry", 0.1, True), ("retry", 0.2, True), ("retry", 0.3, False)],
    "a share of the requests above the floor": [
        *[("req", 0.0)] * 20, *[("retry", 0.5, True)] * 4, ("retry", 0.5, False)],
    "the share rounds down": [
        *[("req", 0.0)] * 24, *[("retry", 0.5, True)] * 4, ("retry", 0.5, False)],
    "retries slide out of the window": [
        *[("retry", 0.0, True)] * 3, ("retry", 9.9, False), ("retry", 10.0, True)],
    "requests slide out of the window too": [
        *[("req", 0.0)] * 30, *[("retry", 5.0, True)] * 6, ("retry", 12.0, False)],
    "a long pause forgets everything": [
        *[("retry", 0.0, True)] * 3, ("retry", 100.0, True)],
    "a refunded retry frees its place": [
        *[("retry", 0.0, True)] * 3, ("refund", 0.5), ("retry", 0.5, True), ("retry", 0.5, False)],
    "a clock reading behind counts in the newest bucket": [
        *[("retry", 5.0, True)] * 3, ("retry", 4.0, False)],
}


@pytest.mark.parametrize("steps", BUDGET_CASES.values(), ids=BUDGET_CASES.keys())
def test_retry_budget(steps: list[tuple]) -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, window_s=10.0)
    for step in steps:
        if step[0] == "req":
            budget.note_request(step[1])
        elif step[0] == "refund":
            budget.refund(step[1])
        else:
            assert budget.try_retry(step[1]) is step[2], step


def test_a_zero_budget_never_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_retries=0, window_s=10.0)
    budget.note_request(0.0)
    assert not budget.try_retry(0.0)


# --- ejection ----------------------------------------------------------------------

EJECT = EjectionConfig(base_s=2.0, max_s=10.0)

# ("eject", now_s, period or None), ("healthy", now_s, re-admitted?)
EJECTION_CASES = {
    "ejected for the base period, then back on a healthy report": [
        ("eject", 0.0, 2.0), ("healthy", 1.9, False), ("healthy", 2.0, True)],
    "reports while ejected change nothing": [
        ("eject", 0.0, 2.0), ("eject", 1.0, None), ("healthy", 2.0, True)],
    "repeated ejections grow the period": [
        ("eject", 0.0, 2.0), ("healthy", 2.0, True), ("eject", 3.0, 4.0),
        ("healthy", 6.9, False), ("healthy", 7.0, True), ("eject", 8.0, 6.0)],
    "the period is capped": [
        ("eject", 0.0, 2.0), ("healthy", 2.0, True), ("eject", 2.0, 4.0),
        ("healthy", 6.0, True), ("eject", 6.0, 6.0), ("healthy", 12.0, True),
        ("eject", 12.0, 8.0), ("healthy", 20.0, True), ("eject", 20.0, 10.0),
        ("healthy", 30.0, True), ("eject", 30.0, 10.0)],
    "staying admitted for max_s starts the count over": [
        ("eject", 0.0, 2.0), ("healthy", 2.0, True), ("eject", 12.0, 2.0)],
    "a healthy report without an ejection is nothing": [("healthy", 0.0, False)],
}


@pytest.mark.parametrize("steps", EJECTION_CASES.values(), ids=EJECTION_CASES.keys())
def test_ejection_timing(steps: list[tuple]) -> None:
    ejections = Ejections(EJECT)
    for kind, now_s, expected in steps:
        if kind == "eject":
            assert ejections.eject("a", now_s) == expected, (kind, now_s)
        else:
            assert ejections.healthy_report("a", now_s) is expected, (kind, now_s)


# --- exclusion filter ----------------------------------------------------------------


def _views(*ids: str) -> list[ReplicaView]:
    return [ReplicaView(id=ReplicaId(i), url="", models=("m",), capacity_blocks=1) for i in ids]


@pytest.mark.parametrize(("exclude", "kept"), [
    (frozenset(), ["a", "b", "c"]),
    (frozenset({"b"}), ["a", "c"]),
    (frozenset({"a", "b", "c"}), []),
    (frozenset({"gone"}), ["a", "b", "c"]),
])
def test_not_excluded_drops_replicas_that_failed_the_request(exclude: frozenset[str],
                                                             kept: list[str]) -> None:
    req = SchedRequest(request_id="r", tenant_id="t", model="m", now_s=0.0, exclude=exclude)
    assert [v.id for v in NotExcluded().filter(req, _views("a", "b", "c"))] == kept


# --- the core ------------------------------------------------------------------------


def _core(n: int = 2) -> SchedulerCore:
    cfg = decode_config({"scheduler": {"ejection": {"base_s": 2.0, "max_s": 10.0}}}, {})
    core = SchedulerCore(cfg.scheduler, random.Random(7))
    core.set_replicas([ReplicaInfo(id=rid, url=f"http://127.0.0.1:{9000 + i}", models=("m",))
                       for i, rid in enumerate("abc"[:n])])
    return core


def _place(core: SchedulerCore, request_id: str, now_s: float = 0.0,
           exclude: tuple[str, ...] = ()) -> str | None:
    reply = core.place(PlaceRequest(request_id=request_id, tenant_id="t", model="m",
                                    exclude=exclude, attempt=2 if exclude else 1), now_s)
    return reply.replica_id if isinstance(reply, Placement) else None


def test_a_retry_excluding_its_replica_is_placed_again_and_moves_its_load() -> None:
    core = _core()
    first = _place(core, "r")
    assert _place(core, "r") == first  # a plain repeat keeps its decision
    other = _place(core, "r", exclude=(first,))
    assert other is not None and other != first
    load = {rid: v.in_flight_requests for rid, v in core.replicas.items()}
    assert load == {first: 0, other: 1} and core.in_flight_count() == 1
    core.done("r")
    assert core.in_flight_count() == 0 and core.replicas[other].in_flight_requests == 0


def test_a_retry_with_every_replica_excluded_is_rejected_and_released() -> None:
    core = _core()
    first = _place(core, "r")
    assert _place(core, "r", exclude=("a", "b")) is None
    assert core.in_flight_count() == 0 and core.replicas[first].in_flight_requests == 0


def test_an_ejected_replica_gets_nothing_until_the_period_and_a_healthy_report() -> None:
    core = _core()
    for rid in "ab":  # both have agents
        core.apply_load(rid, 0, 0, 0.0, now_s=0.0)
        core.set_health(rid, healthy=True, now_s=0.0)
    assert core.replica_failed("a", now_s=0.0) == 2.0
    assert core.replica_failed("a", now_s=0.5) is None
    assert {_place(core, f"r{i}", now_s=1.0) for i in range(6)} == {"b"}
    core.set_health("a", healthy=True, now_s=1.5)  # too early
    assert _place(core, "early", now_s=2.5) == "b"
    core.set_health("a", healthy=False, now_s=2.5)  # its health check fails
    assert not core.replicas[ReplicaId("a")].healthy
    core.set_health("a", healthy=True, now_s=2.6)
    assert _place(core, "back", now_s=2.6) == "a"


def test_a_replica_without_agent_comes_back_after_the_period() -> None:
    core = _core()
    core.replica_failed("a", now_s=0.0)
    assert _place(core, "r1", now_s=1.9) == "b"
    assert _place(core, "r2", now_s=2.0) == "a"  # b has one in flight, a none


def test_unknown_replicas_and_removed_ones_are_not_ejected() -> None:
    core = _core()
    assert core.replica_failed("ghost", now_s=0.0) is None
    core.replica_failed("a", now_s=0.0)
    core.set_replicas([ReplicaInfo(id="b", url="http://127.0.0.1:9001", models=("m",))])
    assert core.ejections.ejected_ids() == []


def test_the_last_replica_that_can_serve_a_model_is_not_ejected() -> None:
    core = _core(3)
    core.set_health("c", draining=True)
    assert core.replica_failed("a", now_s=0.0) == 2.0
    assert core.replica_failed("b", now_s=0.0) is None  # c drains: b is the last
    assert _place(core, "r", now_s=0.5) == "b"


# --- wire ------------------------------------------------------------------------------


def test_retry_messages_round_trip() -> None:
    retry = PlaceRequest(request_id="r", tenant_id="t", model="m", exclude=("a",), attempt=2)
    assert place_request_decoder.decode(encode(retry)) == retry
    failed = ReplicaFailed(replica_id="a", request_id="r", reason="answered 500")
    assert replica_failed_decoder.decode(encode(failed)) == failed
