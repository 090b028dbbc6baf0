"""Unit tests of SchedulerCore: the placement contract under the default
profile, plus load, KV events, profiles and explanations. Injected rng; time
passed in."""

from __future__ import annotations

import random

import pytest

from scheduler.config import decode_config
from scheduler.core import SchedulerCore
from scheduler.framework import SchedRequest
from scheduler.kv_events import AllBlocksCleared, BlockStored
from scheduler.wire import Placement, PlaceRejected, PlaceRequest, ReplicaInfo


def _core(*replicas: tuple[str, tuple[str, ...]], profile: str = "least-load",
          ttl_s: float = 60.0) -> SchedulerCore:
    cfg = decode_config({"scheduler": {"profile": profile, "placement_ttl_s": ttl_s}}, {})
    core = SchedulerCore(cfg.scheduler, random.Random(7))
    core.set_replicas([ReplicaInfo(id=i, url=f"http://127.0.0.1:{n}", models=m)
                       for n, (i, m) in enumerate(replicas, start=9000)])
    return core


def _req(request_id: str, model: str = "m") -> PlaceRequest:
    return PlaceRequest(request_id=request_id, tenant_id="t", model=model)


def _view(request_id: str, now_s: float = 0.0, **fields: object) -> SchedRequest:
    return SchedRequest(request_id=request_id, tenant_id="t", model="m", now_s=now_s, **fields)


def _replica_of(reply: Placement | PlaceRejected) -> str:
    assert isinstance(reply, Placement)
    return reply.replica_id


THREE = (("a", ("m",)), ("b", ("m",)), ("c", ("m",)))


@pytest.mark.parametrize("profile", ["least-load", "prefix-approx", "prefix-precise", "cost",
                                     "round-robin"])
def test_a_burst_spreads_before_any_report(profile: str) -> None:
    core = _core(*THREE, profile=profile)
    picks = [_replica_of(core.place_view(_view(f"r{i}", prompt_tokens=32, max_tokens=32)))
             for i in range(9)]
    assert sorted(picks.count(r) for r in "abc") == [3, 3, 3]


def test_placement_table_contract() -> None:
    core = _core(("a", ("m",)), ("b", ("m",)), ("x", ("other",)), ttl_s=10.0)
    seen = set()
    for i in range(40):
        seen.add(_replica_of(core.place(_req(f"r{i}"), now_s=0.0)))
        core.done(f"r{i}")
    assert seen == {"a", "b"} and core.in_flight_count() == 0
    first = core.place(_req("same"), 0.0)
    assert core.place(_req("same"), 1.0) == first and core.in_flight_count() == 1
    core.place(_req("later"), 5.0)
    assert core.expire(now_s=11.0) == 1 and core.in_flight_count() == 1
    assert [(m.id, m.replicas) for m in core.models()] == [("m", 2), ("other", 1)]


@pytest.mark.parametrize(("health", "code"), [
    ({}, "model_not_found"),
    ({"healthy": False}, "no_capacity"),
    ({"draining": True}, "no_capacity"),
])
def test_rejections_say_why(health: dict[str, bool], code: str) -> None:
    core = _core(("a", ("m",)))
    core.set_health("a", **health)
    reply = core.place(_req("r", model="m" if health else "missing"), 0.0)
    assert isinstance(reply, PlaceRejected) and reply.code == code


def test_registry_changes_keep_load_and_drop_index_entries() -> None:
    core = _core(("a", ("m",)), ("b", ("m",)))
    core.apply_kv_events("b", [BlockStored(block_hashes=[1, 2], parent_block_hash=None,
                                           token_ids=[], block_size=16, lora_id=None,
                                           medium=None, lora_name=None)])
    placed = _replica_of(core.place(_req("r1"), 0.0))
    core.set_replicas([ReplicaInfo(id="a", url="http://a", models=("m",))])
    assert core.index_sizes()["prefix-precise"] == 0
    assert core.replicas["a"].in_flight_requests == (1 if placed == "a" else 0)
    assert core.replicas["a"].url == "http://a"
    assert not core.apply_kv_events("b", [AllBlocksCleared()])
    assert not core.apply_load("b", 1, 1, 0.5, now_s=0.0)


def test_precise_profile_follows_kv_events_and_load_reports_reset_the_burst_count() -> None:
    core = _core(*THREE, profile="prefix-precise")
    stored = BlockStored(block_hashes=[11, 12, 13], parent_block_hash=None, token_ids=[],
                         block_size=16, lora_id=None, medium="GPU", lora_name=None)
    assert core.apply_kv_events("c", [stored])
    reply = core.place_view(_view("r1", block_hashes=(11, 12, 13, 14)))
    assert _replica_of(reply) == "c" and core.replicas["c"].placed_since_report == 1
    assert core.apply_load("c", running=1, waiting=0, kv_cache_usage=0.1, now_s=1.0,
                           capacity_blocks=2)
    assert core.replicas["c"].placed_since_report == 0
    assert core.index_sizes()["prefix-precise"] == 2  # shrunk to the reported capacity


def test_approx_profile_sends_a_shared_prefix_back_where_it_went() -> None:
    core = _core(*THREE, profile="prefix-approx")
    home = _replica_of(core.place_view(_view("r1", chunk_hashes=(1, 2, 3, 4))))
    core.done("r1")
    again = core.place_view(_view("r2", now_s=1.0, chunk_hashes=(1, 2, 3, 9)))
    assert _replica_of(again) == home
    assert core.index_sizes()["prefix-approx"] == 5  # 1, 2, 3, 4 and 9


def test_explain_lists_every_candidate_with_its_scores() -> None:
    core = _core(*THREE, profile="prefix-precise")
    core.set_health("b", draining=True)
    core.place_view(_view("r1", block_hashes=(1,)))
    explained = core.explain_last()
    assert explained is not None
    assert explained["profile"] == "prefix-precise" and explained["request_id"] == "r1"
    assert explained["filtered_out"] == {"not-draining": ["b"]}
    candidates = explained["candidates"]
    assert set(candidates) == {"a", "c"} and explained["chosen"] in candidates
    for entry in candidates.values():
        assert set(entry["scores"]) == {"prefix-precise", "in-flight-requests", "queue-depth"}
        assert entry["total"] == pytest.approx(
            3 * entry["scores"]["prefix-precise"] + entry["scores"]["in-flight-requests"]
            + entry["scores"]["queue-depth"])


def _drain_a(core: SchedulerCore) -> None:
    core.set_health("a", draining=True)


def _stale_a(core: SchedulerCore) -> None:
    core.apply_load("a", 0, 0, 0.0, now_s=0.0)
    assert core.mark_stale(now_s=10.0, stale_s=5.0) == ["a"]


def _a_serves_other(core: SchedulerCore) -> None:
    core.set_replicas([ReplicaInfo(id=rid, url=f"http://{rid}", models=models)
                       for rid, models in (("a", ("other",)), ("b", ("m",)), ("c", ("m",)))])


@pytest.mark.parametrize("change", [
    lambda core: core.set_health("a", healthy=False),
    _drain_a,
    _stale_a,
    lambda core: core.replica_failed("a", now_s=0.0),
    _a_serves_other,
])
def test_a_registry_or_health_change_is_seen_by_the_next_decision(change) -> None:
    """The profile reuses its filters' output while the core's state is
    unchanged; every change to it must show at once."""
    core = _core(*THREE)
    placed = {_replica_of(core.place_view(_view(f"warm{i}"))) for i in range(6)}
    assert placed == {"a", "b", "c"}
    change(core)
    assert "a" not in {_replica_of(core.place_view(_view(f"r{i}"))) for i in range(6)}
    core.set_replicas([ReplicaInfo(id=rid, url=f"http://{rid}", models=("m",)) for rid in "abc"])
    core.set_health("a", healthy=True, draining=False, now_s=100.0)
    assert "a" in {_replica_of(core.place_view(_view(f"back{i}", now_s=100.0)))
                   for i in range(9)}
