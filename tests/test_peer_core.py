"""Unit tests of scheduler cores kept consistent by each other's placements
(SchedulerCore.apply_peer): counts, learning, stale broadcasts. Injected rng;
time passed in."""

from __future__ import annotations

import random

import pytest

from scheduler import core as core_module
from scheduler.config import decode_config
from scheduler.core import SchedulerCore, peer_placed
from scheduler.wire import PeerPlaced, Placement, PlaceRequest, ReplicaInfo

REPLICAS = ("a", "b", "c", "d")


def _core(seed: int, profile: str = "least-load") -> SchedulerCore:
    cfg = decode_config({"scheduler": {"profile": profile, "placement_ttl_s": 60.0}}, {})
    core = SchedulerCore(cfg.scheduler, random.Random(seed))
    core.set_replicas([ReplicaInfo(id=r, url=f"http://127.0.0.1:{9000 + i}", models=("m",))
                       for i, r in enumerate(REPLICAS)])
    return core


def _req(request_id: str, **fields: object) -> PlaceRequest:
    return PlaceRequest(request_id=request_id, tenant_id="t", model="m", prompt_tokens=10,
                        max_tokens=20, **fields)


def _place(core: SchedulerCore, req: PlaceRequest, now_s: float = 0.0) -> Placement:
    reply = core.place(req, now_s)
    assert isinstance(reply, Placement)
    return reply


def _run(peers: bool, profile: str, requests: int = 48) -> tuple[dict, dict, int]:
    """Requests spread at random over two actors (as a NATS queue group does);
    each finishes 24 placements later. With `peers`, each core hears the
    other's placements. Returns both views and the worst spread (most minus
    fewest requests in flight on a replica) of the real load along the way."""
    actors = {"s0": _core(1, profile), "s1": _core(2, profile)}
    route = random.Random(5)
    placed: list[str] = []
    worst_spread = 0
    for i in range(requests):
        name = route.choice(sorted(actors))
        req = _req(f"r{i}", chunk_hashes=(i % 3, 100 + i))
        placement = _place(actors[name], req, now_s=i * 0.01)
        placed.append(placement.replica_id)
        running = placed[max(0, i - 24):]  # in flight right after this placement
        worst_spread = max(worst_spread, max(map(running.count, REPLICAS))
                           - min(map(running.count, REPLICAS)))
        if peers:
            for other, core in actors.items():
                if other != name:
                    assert core.apply_peer(peer_placed(name, req, placement), i * 0.01)
        if i >= 24:
            for core in actors.values():
                core.done(f"r{i - 24}")
    return actors["s0"].in_flight_by_replica(), actors["s1"].in_flight_by_replica(), worst_spread


@pytest.mark.parametrize("profile", ["least-load", "prefix-approx", "cost"])
def test_two_cores_fed_each_others_placements_agree_and_spread(profile: str) -> None:
    view0, view1, worst_spread = _run(peers=True, profile=profile)
    assert view0 == view1
    assert sum(view0.values()) == 24
    if profile == "least-load":
        # Every decision saw every earlier one: never more than one apart.
        assert worst_spread == 1


def test_without_peers_the_views_differ_and_the_spread_is_uneven() -> None:
    """The negative control: each actor counting only its own placements."""
    view0, view1, worst_spread = _run(peers=False, profile="least-load")
    assert view0 != view1
    assert worst_spread > 1


def test_a_completion_notice_that_overtakes_the_broadcast_leaves_no_phantom() -> None:
    origin, peer = _core(1), _core(2)
    req = _req("r1")
    placement = _place(origin, req)
    for core in (origin, peer):
        core.done("r1")
    assert not peer.apply_peer(peer_placed("s0", req, placement), now_s=0.1)
    assert peer.in_flight_count() == 0 and set(peer.in_flight_by_replica().values()) == {0}


@pytest.mark.parametrize(("replica_id", "already_counted"), [
    ("ghost", False),  # not registered here
    ("a", True),       # heard twice, or this core placed it too
])
def test_stale_broadcasts_count_nothing(replica_id: str, already_counted: bool) -> None:
    core = _core(1)
    if already_counted:
        _place(core, _req("r1"))
    before = core.in_flight_by_replica()
    assert not core.apply_peer(PeerPlaced(actor_id="s1", request_id="r1", tenant_id="t",
                                          model="m", replica_id=replica_id), now_s=0.0)
    assert core.in_flight_by_replica() == before


def test_a_request_retried_on_a_peer_keeps_the_first_decision() -> None:
    origin, peer = _core(1), _core(2)
    req = _req("r1")
    placement = _place(origin, req)
    assert peer.apply_peer(peer_placed("s0", req, placement), now_s=0.0)
    assert _place(peer, req, now_s=0.1) == placement
    assert peer.in_flight_count() == 1


def test_peer_placements_expire_and_release_like_own_ones() -> None:
    origin, peer = _core(1), _core(2)
    req = _req("r1")
    placement = _place(origin, req)
    assert peer.apply_peer(peer_placed("s0", req, placement), now_s=0.0)
    assert peer.replicas[placement.replica_id].in_flight_tokens == 30
    assert peer.expire(now_s=61.0) == 1
    assert peer.replicas[placement.replica_id].in_flight_tokens == 0


# A long shared prefix: with the cost profile its saved prefill must outweigh
# the queue depth the first placement left on its replica.
SHARED, OTHER = tuple(range(1, 17)), (*range(1, 16), 99)


@pytest.mark.parametrize(("profile", "fields", "follow_up"), [
    ("prefix-approx", {"chunk_hashes": SHARED}, {"chunk_hashes": OTHER}),
    ("cost", {"chunk_hashes": SHARED}, {"chunk_hashes": OTHER}),
    # Prompts just sent, before the replica's KV events say it holds them.
    ("prefix-precise", {"block_hashes": SHARED}, {"block_hashes": OTHER}),
    ("cost", {"block_hashes": SHARED}, {"block_hashes": OTHER}),
])
def test_peers_learn_the_same_prefixes(profile: str, fields: dict, follow_up: dict) -> None:
    origin, peer = _core(1, profile), _core(2, profile)
    req = _req("r1", **fields)
    placement = _place(origin, req)
    assert peer.apply_peer(peer_placed("s0", req, placement), now_s=0.0)
    for core in (origin, peer):
        core.done("r1")
    assert _place(peer, _req("r2", **follow_up), now_s=1.0).replica_id == placement.replica_id


def test_peers_learn_sessions() -> None:
    raw = {"scheduler": {"profile": "sticky", "profiles": {"sticky": {"scorers": [
        {"name": "session-affinity", "weight": 2.0},
        {"name": "in-flight-requests", "weight": 1.0}]}}}}
    origin, peer = (SchedulerCore(decode_config(raw, {}).scheduler, random.Random(seed))
                    for seed in (1, 2))
    for core in (origin, peer):
        core.set_replicas([ReplicaInfo(id=r, url="http://x", models=("m",)) for r in REPLICAS])
    req = _req("r1", session_id="conversation-1")
    placement = _place(origin, req)
    assert peer.apply_peer(peer_placed("s0", req, placement), now_s=0.0)
    home = placement.replica_id
    assert _place(peer, _req("r2", session_id="conversation-1")).replica_id == home


def test_the_memory_of_done_requests_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_module, "DONE_MEMORY_IDS", 2)
    origin, peer = _core(1), _core(2)
    req = _req("r0")
    placement = _place(origin, req)
    for request_id in ("r0", "r1", "r2"):
        peer.done(request_id)
    # r0 fell out of the memory: a broadcast heard now is counted (until its TTL).
    assert peer.apply_peer(peer_placed("s0", req, placement), now_s=0.0)
    assert not peer.apply_peer(peer_placed("s0", _req("r2"), placement), now_s=0.0)


def test_a_retry_placed_elsewhere_moves_the_peers_count() -> None:
    """The ingress retries on another replica (same id, attempt 2, the failed
    one excluded): the peer's count moves with it, and the final notice
    releases it wherever it is."""
    origin, peer = _core(1), _core(2)
    first = _place(origin, _req("r1"))
    assert peer.apply_peer(peer_placed("s0", _req("r1"), first), now_s=0.0)
    retry_req = _req("r1", exclude=(first.replica_id,), attempt=2)
    retry = _place(origin, retry_req, now_s=0.1)
    assert retry.replica_id != first.replica_id
    assert peer.apply_peer(peer_placed("s0", retry_req, retry), now_s=0.1)
    counts = {rid: view.in_flight_requests for rid, view in peer.replicas.items()}
    assert counts == {rid: int(rid == retry.replica_id) for rid in REPLICAS}
    for core in (origin, peer):
        core.done("r1")
        assert core.in_flight_count() == 0
        assert set(core.in_flight_by_replica().values()) == {0}


def test_the_same_attempt_placed_twice_keeps_the_own_count() -> None:
    """Two actors both answered one placement (the ingress re-sent it after a
    slow answer): each keeps its own count, and the notice releases both."""
    cores = _core(1), _core(2)
    placements = [_place(core, _req("r1")) for core in cores]
    for core, other in zip(cores, reversed(placements), strict=True):
        assert not core.apply_peer(peer_placed("s", _req("r1"), other), now_s=0.0)
        assert core.in_flight_count() == 1
        core.done("r1")
        assert set(core.in_flight_by_replica().values()) == {0}
