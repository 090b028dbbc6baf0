"""Unit tests of placement under saturation: the detector, the fair queue,
tenant priorities and the waiting room. Table-driven; time passed in, rng
injected."""

from __future__ import annotations

import random

import pytest

from scheduler.config import SaturationConfig, decode_config
from scheduler.core import SchedulerCore
from scheduler.errors import PLACEMENT_ERRORS, InvalidRequest, QueueFull, QueueTimeout
from scheduler.fair_queue import FairQueue
from scheduler.framework import ReplicaId, ReplicaView
from scheduler.priority import PriorityRange
from scheduler.saturation import all_saturated, is_saturated, waiting_estimate
from scheduler.waiting_room import Reply, WaitingRoom
from scheduler.wire import Placement, PlaceQueued, PlaceRejected, PlaceRequest, ReplicaInfo

# --- the detector -------------------------------------------------------------------

CFG = SaturationConfig(waiting_requests=5, kv_cache_usage=0.8, max_num_seqs=8)


def _replica(**load: object) -> ReplicaView:
    return ReplicaView(id=ReplicaId("a"), url="http://127.0.0.1:1", models=("m",),
                       capacity_blocks=64, **load)


@pytest.mark.parametrize(("load", "waiting", "saturated"), [
    ({}, 0, False),
    ({"waiting": 4}, 4, False),
    ({"waiting": 5}, 5, True),
    # A queue was reported: everything placed since waits too.
    ({"waiting": 1, "placed_since_report": 4, "in_flight_requests": 4}, 5, True),
    # No queue reported: placements since first fill the free batch slots.
    ({"running": 2, "placed_since_report": 6, "in_flight_requests": 6}, 0, False),
    ({"running": 7, "placed_since_report": 6, "in_flight_requests": 6}, 5, True),
    # ... and count only while in flight: four of them are done.
    ({"running": 7, "placed_since_report": 6, "in_flight_requests": 2}, 1, False),
    # A burst before any report: in flight beyond max_num_seqs waits.
    ({"in_flight_requests": 12}, 4, False),
    ({"in_flight_requests": 13}, 5, True),
    ({"kv_cache_usage": 0.79}, 0, False),
    ({"kv_cache_usage": 0.8}, 0, True),
])
def test_saturation_counts_load_made_at_decision_time(load: dict, waiting: int,
                                                      saturated: bool) -> None:
    replica = _replica(**load)
    assert waiting_estimate(replica, CFG.max_num_seqs) == waiting
    assert is_saturated(replica, CFG) is saturated


def test_all_saturated_needs_every_replica_and_at_least_one() -> None:
    full, idle = _replica(waiting=9), _replica()
    assert all_saturated([full, full], CFG)
    assert not all_saturated([full, idle], CFG)
    assert not all_saturated([], CFG)


# --- the fair queue ---------------------------------------------------------------------


def _drain(queue: FairQueue[str]) -> list[str]:
    keys = []
    while (entry := queue.pop()) is not None:
        keys.append(entry.key)
    return keys


def test_bands_highest_first_and_tenants_take_turns() -> None:
    queue: FairQueue[str] = FairQueue(cap=100, tenant_cap=100)
    for key, tenant, priority in [("b1", "burst", 0), ("b2", "burst", 0), ("b3", "burst", 0),
                                  ("s1", "solo", 0), ("low", "solo", -1), ("v1", "vip", 2),
                                  ("o1", "other", 0), ("b4", "burst", 0)]:
        assert queue.push(key, tenant, priority, 10.0, key) == []
    assert queue.lengths() == {0: 6, -1: 1, 2: 1}
    assert queue.peek() is not None and queue.peek().key == "v1"
    assert _drain(queue) == ["v1", "b1", "s1", "o1", "b2", "b3", "b4", "low"]
    assert len(queue) == 0 and queue.lengths() == {}


def test_deadlines_expire_in_order_and_removed_entries_do_not_count() -> None:
    queue: FairQueue[str] = FairQueue(cap=100, tenant_cap=100)
    for key, deadline_s in [("late", 9.0), ("early", 1.0), ("mid", 5.0), ("gone", 0.5)]:
        queue.push(key, "t", 0, deadline_s, key)
    assert queue.remove("gone") is not None and queue.remove("gone") is None
    assert queue.next_deadline_s() == 1.0
    assert [e.key for e in queue.expire(5.0)] == ["early", "mid"]
    assert queue.next_deadline_s() == 9.0 and "late" in queue and "mid" not in queue
    assert queue.expire(8.9) == [] and _drain(queue) == ["late"]
    assert queue.next_deadline_s() is None


@pytest.mark.parametrize(("pushes", "refused", "left"), [
    # A tenant at its cap gets its new entry refused; others still get in.
    ([("a1", "a", 0), ("a2", "a", 0), ("a3", "a", 0), ("b1", "b", 0)],
     ["a3"], {"a1", "a2", "b1"}),
    # Over the total cap: the lowest band goes first (sheddable before normal).
    ([("s1", "a", -1), ("n1", "b", 0), ("n2", "c", 0), ("n3", "d", 0)],
     ["s1"], {"n1", "n2", "n3"}),
    # Within the lowest band, the newest entry of the tenant holding most of it.
    ([("a1", "a", 0), ("a2", "a", 0), ("b1", "b", 0), ("c1", "c", 0)],
     ["a2"], {"a1", "b1", "c1"}),
    # Work below everything queued is itself the one refused.
    ([("n1", "a", 0), ("n2", "b", 0), ("n3", "c", 0), ("s1", "d", -1)],
     ["s1"], {"n1", "n2", "n3"}),
])
def test_caps_refuse_the_tenant_over_its_share_then_the_lowest_newest(
        pushes: list[tuple[str, str, int]], refused: list[str], left: set[str]) -> None:
    queue: FairQueue[str] = FairQueue(cap=3, tenant_cap=2)
    out = [e.key for key, tenant, p in pushes for e in queue.push(key, tenant, p, 10.0, key)]
    assert out == refused
    assert set(_drain(queue)) == left


def test_a_key_is_queued_once() -> None:
    queue: FairQueue[str] = FairQueue(cap=3, tenant_cap=3)
    queue.push("r", "t", 0, 1.0, "r")
    with pytest.raises(ValueError, match="already queued"):
        queue.push("r", "t", 0, 1.0, "r")


# --- tenant priorities ----------------------------------------------------------------


@pytest.mark.parametrize(("policy", "asked", "priority"), [
    (PriorityRange(), None, 0),
    (PriorityRange(), "", 0),
    (PriorityRange(), "-1", -1),
    (PriorityRange(), "-7", -1),
    (PriorityRange(), "3", 0),
    (PriorityRange(default=1, lowest=-2, highest=5), None, 1),
    (PriorityRange(default=1, lowest=-2, highest=5), " 4 ", 4),
    (PriorityRange(default=1, lowest=-2, highest=5), "9", 5),
])
def test_header_priority_is_clamped_into_the_tenants_range(
        policy: PriorityRange, asked: str | None, priority: int) -> None:
    assert policy.resolve(asked) == priority


def test_a_priority_that_is_not_an_integer_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        PriorityRange().resolve("high")
    assert info.value.status == 400 and info.value.param == "x-priority"


def test_a_default_outside_its_range_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        PriorityRange(default=2, lowest=0, highest=1)


def test_queue_errors_map_to_429_and_503_with_their_codes() -> None:
    assert PLACEMENT_ERRORS["queue_full"] is QueueFull and QueueFull.status == 429
    assert PLACEMENT_ERRORS["queue_timeout"] is QueueTimeout and QueueTimeout.status == 503


# --- the waiting room ---------------------------------------------------------------


def _room(**saturation: object) -> WaitingRoom:
    # max_num_seqs 1, waiting_requests 1: each replica takes two placements.
    cfg = decode_config({"scheduler": {"saturation": {
        "max_num_seqs": 1, "waiting_requests": 1, "retry_after_s": 2.0, **saturation}}}, {})
    core = SchedulerCore(cfg.scheduler, random.Random(5))
    core.set_replicas([ReplicaInfo(id="a", url="http://127.0.0.1:9", models=("m",))])
    return WaitingRoom(core, cfg.scheduler.saturation)


def _req(request_id: str, tenant: str = "t", priority: int = 0,
         max_queue_s: float = 5.0, model: str = "m") -> PlaceRequest:
    return PlaceRequest(request_id=request_id, tenant_id=tenant, model=model,
                        priority=priority, max_queue_s=max_queue_s)


def _kinds(replies: list[Reply]) -> list[tuple[str, str, str]]:
    """(inbox, request id, what) of each reply; what: replica id or rejection code."""
    def what(m: object) -> str:
        if isinstance(m, Placement):
            return m.replica_id
        return "queued" if isinstance(m, PlaceQueued) else m.code  # type: ignore[attr-defined]
    return [(r.subject, r.message.request_id, what(r.message)) for r in replies]


def test_waiting_room_places_queues_sheds_and_dispatches_in_order() -> None:
    room = _room()
    assert _kinds(room.place(_req("r1"), "i1", 0.0)) == [("i1", "r1", "a")]
    assert _kinds(room.place(_req("r2"), "i2", 0.0)) == [("i2", "r2", "a")]
    table = [
        (_req("q1", tenant="burst"), "queued"),
        (_req("q2", tenant="burst"), "queued"),
        (_req("q3", tenant="solo"), "queued"),
        (_req("vip", tenant="vip", priority=1), "queued"),
        (_req("shed", priority=-1), "no_capacity"),
        (_req("now", max_queue_s=0.0), "no_capacity"),
        (_req("other", model="missing"), "model_not_found"),
    ]
    for req, what in table:
        assert _kinds(room.place(req, "in-" + req.request_id, 1.0)) == [
            ("in-" + req.request_id, req.request_id, what)]
    refusals = [room.place(_req("shed", priority=-1), "x", 1.0)[0].message]
    assert isinstance(refusals[0], PlaceRejected) and refusals[0].retry_after_s == 2.0
    assert room.dispatch(1.0) == []
    order = []
    for done in ("r1", "r2", "q1", "vip", "q3"):
        room.core.done(done)
        order += [request_id for _, request_id, _ in _kinds(room.dispatch(2.0))]
    assert order == ["vip", "q1", "q3", "q2"]
    assert room.stats()["queued_priority_0"] == 0 and room.stats()["dequeued"] == 4


def test_waiting_room_deadlines_caps_and_cancellation() -> None:
    room = _room(tenant_queue_cap_requests=2, queue_cap_requests=3)
    room.place(_req("r1"), "i", 0.0)
    room.place(_req("r2"), "i", 0.0)
    assert _kinds(room.place(_req("t1", max_queue_s=1.0), "i1", 0.0))[0][2] == "queued"
    assert _kinds(room.place(_req("t2", max_queue_s=3.0), "i2", 0.0))[0][2] == "queued"
    assert _kinds(room.place(_req("t3"), "i3", 0.0)) == [("i3", "t3", "queue_full")]
    assert _kinds(room.place(_req("s1", tenant="u", priority=1), "j", 0.0))[0][2] == "queued"
    # Over the total cap: the tenant holding most of the lowest band loses its newest.
    assert _kinds(room.place(_req("s2", tenant="w", priority=1), "k", 0.0)) == [
        ("k", "s2", "queued"), ("i2", "t2", "queue_full")]
    assert room.next_deadline_s() == 1.0
    assert _kinds(room.expire(1.0)) == [("i1", "t1", "queue_timeout")]
    assert room.cancel("m", "s1") and not room.cancel("m", "s1")
    assert room.stats() == {"queued_priority_0": 0, "queued_priority_1": 1, "enqueued": 4,
                            "dequeued": 0, "shed": 0, "queue_timeout": 1, "queue_full": 2,
                            "queue_cancelled": 1}


def test_a_request_sent_again_while_waiting_is_answered_on_its_newest_inbox() -> None:
    room = _room()
    room.place(_req("r1"), "i", 0.0)
    room.place(_req("r2"), "i", 0.0)
    room.place(_req("w"), "old", 0.0)
    assert _kinds(room.place(_req("w"), "new", 0.5)) == [("new", "w", "queued")]
    room.core.done("r1")
    assert _kinds(room.dispatch(1.0)) == [("new", "w", "a")]
