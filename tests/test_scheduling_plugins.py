"""Unit tests of the scheduling plugins, indexes and registry. Table-driven,
pure, with the decision time carried by the request and an injected rng."""

from __future__ import annotations

import random

import pytest

from scheduler.approx_index import ApproxIndex, chunk_hashes
from scheduler.config import CostParams, ModelConfig, ProfileConfig, ScorerRef, decode_config
from scheduler.errors import ConfigError
from scheduler.filters import Healthy, NotDraining, NotExcluded, ServesModel
from scheduler.framework import (
    Profile,
    ReplicaId,
    ReplicaView,
    SchedRequest,
    WeightedScorer,
)
from scheduler.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from scheduler.pickers import MaxScore, RoundRobin, WeightedRandom
from scheduler.prefix_index import PrefixIndex, ReplicaHashSets
from scheduler.registry import PluginState, build_profile, build_profiles
from scheduler.scorers import (
    Cost,
    InFlightRequests,
    InFlightTokens,
    KvCacheUsage,
    PreciseHoldings,
    PrefixApprox,
    PrefixPrecise,
    QueueDepth,
    SessionAffinity,
    SessionTable,
)

A, B, C = ReplicaId("a"), ReplicaId("b"), ReplicaId("c")


def _view(rid: str, **fields: object) -> ReplicaView:
    base: dict[str, object] = {"url": f"http://{rid}", "models": ("m",), "capacity_blocks": 100}
    return ReplicaView(id=ReplicaId(rid), **(base | fields))


def _req(**fields: object) -> SchedRequest:
    base: dict[str, object] = {"request_id": "r", "tenant_id": "t", "model": "m", "now_s": 0.0}
    return SchedRequest(**(base | fields))


def _stored(*hashes: int | bytes, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=None, token_ids=[],
                       block_size=16, lora_id=None, medium=medium, lora_name=None)


# --- filters ---------------------------------------------------------------------

@pytest.mark.parametrize(("plugin", "views", "kept"), [
    (Healthy(), [_view("a"), _view("b", healthy=False)], ["a"]),
    (ServesModel(), [_view("a", models=("x", "m")), _view("b", models=("x",))], ["a"]),
    (NotDraining(), [_view("a", draining=True), _view("b")], ["b"]),
    (Healthy(), [], []),
])
def test_filters(plugin, views: list[ReplicaView], kept: list[str]) -> None:
    assert [r.id for r in plugin.filter(_req(), views)] == kept


# --- load scorers ---------------------------------------------------------------------

@pytest.mark.parametrize(("scorer", "views", "expected"), [
    (InFlightRequests(), [_view("a", in_flight_requests=0), _view("b", in_flight_requests=4),
                          _view("c", in_flight_requests=2)], {"a": 1.0, "b": 0.0, "c": 0.5}),
    (InFlightRequests(), [_view("a", in_flight_requests=3), _view("b", in_flight_requests=3)],
     {"a": 1.0, "b": 1.0}),
    (InFlightTokens(), [_view("a", in_flight_tokens=100), _view("b", in_flight_tokens=300)],
     {"a": 1.0, "b": 0.0}),
    (QueueDepth(), [_view("a", waiting=2), _view("b", waiting=0, placed_since_report=4)],
     {"a": 1.0, "b": 0.0}),
    (KvCacheUsage(), [_view("a", kv_cache_usage=0.25), _view("b", kv_cache_usage=1.5)],
     {"a": 0.75, "b": 0.0}),
])
def test_load_scorers(scorer, views: list[ReplicaView], expected: dict[str, float]) -> None:
    # A list aligned with the candidates.
    assert scorer.score(_req(), views) == pytest.approx(list(expected.values()))


def test_session_affinity_follows_the_session_and_stays_bounded() -> None:
    sessions = SessionTable(max_sessions=2)
    scorer = SessionAffinity(sessions)
    views = [_view("a"), _view("b")]
    assert scorer.score(_req(session_id="s1"), views) == {}
    scorer.placed(_req(session_id="s1"), views[1])
    assert scorer.score(_req(session_id="s1"), views) == {"b": 1.0}
    assert scorer.score(_req(), views) == {}
    scorer.placed(_req(session_id="s2"), views[0])
    scorer.placed(_req(session_id="s3"), views[0])
    assert len(sessions) == 2 and sessions.get("s1") is None


# --- pickers -------------------------------------------------------------------------

def _pick(picker, totals: dict[ReplicaId, float], rng: random.Random) -> ReplicaId:
    return picker.pick(_req(), list(totals), list(totals.values()), rng)


def test_max_score_picks_the_best_and_breaks_ties_at_random() -> None:
    rng = random.Random(3)
    assert _pick(MaxScore(), {A: 0.2, B: 0.9, C: 0.5}, rng) == B
    seen = {_pick(MaxScore(), {A: 1.0, B: 1.0, C: 0.0}, rng) for _ in range(50)}
    assert seen == {A, B}


@pytest.mark.parametrize(("scores", "allowed"), [
    ({A: 0.0, B: 1.0}, {B}),
    ({A: 0.0, B: 0.0}, {A, B}),
    ({A: 0.5, B: 0.5}, {A, B}),
])
def test_weighted_random_draws_in_proportion(scores, allowed) -> None:
    rng = random.Random(5)
    assert {_pick(WeightedRandom(), scores, rng) for _ in range(100)} == allowed


def test_round_robin_cycles_by_id() -> None:
    picker, rng = RoundRobin(), random.Random(0)
    assert [_pick(picker, {B: 0.0, A: 0.0, C: 0.0}, rng) for _ in range(4)] == [
        A, B, C, A]


# --- precise index -------------------------------------------------------------------

@pytest.mark.parametrize(("held", "request_blocks", "expected"), [
    ({"a": [1, 2, 3, 4]}, [1, 2, 3, 4], {"a": 4, "b": 0}),
    ({"a": [1, 2, 4, 5]}, [1, 2, 3, 6, 7], {"a": 2, "b": 0}),  # block 2 not held ends the run
    ({"a": [2, 3]}, [1, 2, 3], {"a": 0, "b": 0}),              # no block 0: no overlap
    ({"a": [1, 2], "b": [1, 2, 3]}, [1, 2, 3, 9], {"a": 2, "b": 3}),
    ({"a": [1]}, [], {"a": 0, "b": 0}),
])
def test_longest_prefix_from_block_zero(held, request_blocks, expected) -> None:
    index = PrefixIndex(default_capacity_blocks=100)
    for rid, blocks in held.items():
        index.apply_events(ReplicaId(rid), [_stored(*blocks)])
    assert index.longest_prefix(request_blocks, [A, B]) == expected


def test_kv_events_store_remove_and_clear() -> None:
    index = PrefixIndex(default_capacity_blocks=100)
    digest = bytes(24) + (7).to_bytes(8, "big")
    index.apply_events(A, [_stored(1, 2, 3), _stored(digest), _stored(9, medium="CPU")])
    index.apply_events(B, [_stored(1, 2)])
    assert index.longest_prefix([1, 2, 3], [A, B]) == {A: 3, B: 2}
    assert index.longest_prefix([7], [A]) == {A: 1}  # a full digest is keyed by its low 64 bits
    assert index.longest_prefix([9], [A]) == {A: 0}  # offloaded blocks do not count
    index.apply_events(A, [BlockRemoved(block_hashes=[2], medium="GPU")])
    assert index.longest_prefix([1, 2, 3], [A, B]) == {A: 1, B: 2}
    index.apply_events(A, [AllBlocksCleared()])
    assert index.longest_prefix([1, 2], [A, B]) == {A: 0, B: 2}
    assert index.size_blocks() == 2


def test_index_is_bounded_per_replica_by_lru() -> None:
    index = PrefixIndex(default_capacity_blocks=3)
    index.apply_events(A, [_stored(1, 2, 3)])
    index.apply_events(A, [_stored(1)])       # touched again: now most recent
    index.apply_events(A, [_stored(4, 5)])    # evicts 2 and 3, never 1
    assert index.replica_blocks(A) == 3 and index.evicted_blocks == 2
    assert index.longest_prefix([1, 2, 3], [A]) == {A: 1}
    assert index.longest_prefix([1, 4, 5], [A]) == {A: 3}
    index.set_capacity(A, 1)
    assert index.size_blocks() == 1


def test_dropped_replica_frees_its_slot() -> None:
    sets = ReplicaHashSets(default_capacity_blocks=10)
    sets.add_many(A, [1])
    sets.drop(A)
    sets.add_many(B, [2])
    assert sets.longest_prefix([1], [A, B]) == {A: 0, B: 0}
    assert sets.longest_prefix([2], [B]) == {B: 1} and sets.size_blocks() == 1


# --- approximate index -------------------------------------------------------------------

def test_chunk_hashes_are_chained_and_skip_a_partial_tail() -> None:
    one = chunk_hashes(b"aaaabbbbcc", chunk_bytes=4, max_chunks=10)
    other = chunk_hashes(b"xxxxbbbb", chunk_bytes=4, max_chunks=10)
    assert len(one) == 2 and one[1] != other[1]  # same chunk, different prefix
    assert chunk_hashes(b"aaaabbbb", 4, max_chunks=1) == one[:1]


@pytest.mark.parametrize(("now_s", "expected"), [(5.0, 3), (10.0, 1), (20.0, 0)])
def test_approx_index_expires_after_the_ttl(now_s: float, expected: int) -> None:
    index = ApproxIndex(default_capacity_blocks=10, ttl_s=10.0)
    index.record(A, [1, 2, 3], now_s=0.0)
    index.record(A, [1], now_s=5.0)
    assert index.longest_prefix([1, 2, 3], [A], now_s) == {A: expected}


def test_approx_index_evicts_tails_first_at_capacity() -> None:
    index = ApproxIndex(default_capacity_blocks=4, ttl_s=100.0)
    index.record(A, [1, 2, 3], now_s=0.0)
    index.record(A, [7, 8], now_s=1.0)
    assert index.replica_blocks(A) == 4
    assert index.longest_prefix([1, 2, 3], [A], 2.0) == {A: 2}
    index.record(A, [9], now_s=200.0)  # recording purges what expired
    assert index.size_blocks() == 1


def _holdings(precise: PrefixIndex, pending_ttl_s: float = 10.0) -> PreciseHoldings:
    return PreciseHoldings(precise, ApproxIndex(100, ttl_s=pending_ttl_s))


def test_a_prompt_just_sent_counts_as_held_until_its_events_come_or_the_ttl_ends() -> None:
    precise = PrefixIndex(100)
    scorer = PrefixPrecise(_holdings(precise, pending_ttl_s=8.0),
                           PrefixApprox(ApproxIndex(100, 60.0)))
    views = [_view("a"), _view("b")]
    scorer.placed(_req(block_hashes=(1, 2, 3, 4), now_s=0.0), views[1])
    # Its prefill is still running: no KV event yet, but the burst follows it.
    assert scorer.score(_req(block_hashes=(1, 2, 9, 9), now_s=1.0), views) == {"b": 0.5}
    # The events say more than the pending entry: the longer run counts.
    precise.apply_events(B, [_stored(1, 2, 3, 4, 5)])
    assert scorer.score(_req(block_hashes=(1, 2, 3, 4, 5, 6), now_s=2.0), views) == {
        "b": 5 / 6}
    precise.apply_events(B, [AllBlocksCleared()])
    assert scorer.score(_req(block_hashes=(1, 2, 3, 4), now_s=3.0), views) == {"b": 1.0}
    assert scorer.score(_req(block_hashes=(1, 2, 3, 4), now_s=20.0), views) == {}


def test_a_prompt_whose_replica_already_holds_most_of_it_adds_no_pending_entry() -> None:
    precise = PrefixIndex(100)
    holdings = _holdings(precise)
    scorer = PrefixPrecise(holdings, PrefixApprox(ApproxIndex(100, 60.0)))
    views = [_view("a"), _view("b")]
    precise.apply_events(B, [_stored(1, 2)])
    for blocks, recorded in [((1, 2, 3, 4), 0),   # half of it already there: nothing new
                             ((1, 2, 3, 4, 5), 4),  # less than half: its marks (1, 2, 4, 5)
                             ((7, 8), 2)]:          # none of it anywhere
        req = _req(block_hashes=blocks, now_s=0.0)
        scorer.score(req, views)
        before = holdings.pending.size_blocks()
        scorer.placed(req, views[1])
        assert holdings.pending.size_blocks() - before == recorded


def test_without_a_pending_ttl_only_the_events_count() -> None:
    precise = PrefixIndex(100)
    scorer = PrefixPrecise(PreciseHoldings(precise, None), PrefixApprox(ApproxIndex(100, 60.0)))
    views = [_view("a"), _view("b")]
    scorer.placed(_req(block_hashes=(1, 2, 3, 4), now_s=0.0), views[1])
    assert scorer.score(_req(block_hashes=(1, 2, 3, 4), now_s=1.0), views) == {}
    precise.apply_events(A, [_stored(1, 2)])
    assert scorer.score(_req(block_hashes=(1, 2, 3, 4), now_s=1.0), views) == {"a": 0.5}


def test_prefix_scorers_give_the_matched_fraction_of_holders_only() -> None:
    # Replicas a prefix scorer leaves out score 0 (see Scorer.score); the
    # profile ignores holders that are not candidates.
    precise, approx = PrefixIndex(100), ApproxIndex(100, ttl_s=60.0)
    precise.apply_events(A, [_stored(1, 2)])
    precise.apply_events(C, [_stored(1, 2, 3)])  # not a candidate
    views = [_view("a"), _view("b")]
    assert PrefixPrecise(_holdings(precise), PrefixApprox(approx)).score(
        _req(block_hashes=(1, 2, 3, 4)), views) == {"a": 0.5, "c": 0.75}
    scorer = PrefixApprox(approx)
    scorer.placed(_req(chunk_hashes=(5, 6)), views[1])
    assert scorer.score(_req(chunk_hashes=(5, 6, 7, 8), now_s=1.0), views) == {"b": 0.5}
    assert scorer.score(_req(chunk_hashes=(7, 5), now_s=1.0), views) == {}
    assert scorer.score(_req(), views) == {}


@pytest.mark.parametrize(("a_fields", "b_fields", "best"), [
    ({}, {}, {"a", "b"}),                                   # nothing cached, no load: a tie
    ({"in_flight_tokens": 16 * 5}, {}, {"b"}),              # decode load
    ({"kv_cache_usage": 0.5}, {}, {"b"}),                   # reported load counts too
    ({"in_flight_tokens": 16 * 3}, {"held": True}, {"b"}),  # 4 cached blocks beat 3 of load
    ({}, {"held": True, "in_flight_tokens": 16 * 5}, {"a"}),
])
def test_cost_prefers_cached_prefill_against_decode_load(a_fields, b_fields, best) -> None:
    precise = PrefixIndex(100)
    if b_fields.pop("held", False):
        precise.apply_events(B, [_stored(1, 2, 3, 4)])
    scorer = Cost(_holdings(precise), ApproxIndex(100, 60.0), CostParams(),
                  {"m": ModelConfig(block_size_tokens=16)})
    scores = scorer.score(_req(block_hashes=(1, 2, 3, 4), prompt_tokens=64),
                          [_view("a", **a_fields), _view("b", **b_fields)])
    assert {rid for rid, s in zip("ab", scores, strict=True) if s == 1.0} == best
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_prefix_precise_falls_back_to_the_approximate_index_without_block_hashes() -> None:
    precise, approx = PrefixIndex(100), ApproxIndex(100, ttl_s=60.0)
    precise.apply_events(A, [_stored(5, 6)])  # the same ints as block hashes: not consulted
    views = [_view("a"), _view("b")]
    scorer = PrefixPrecise(_holdings(precise), PrefixApprox(approx))
    scorer.placed(_req(chunk_hashes=(5, 6)), views[1])
    assert scorer.score(_req(chunk_hashes=(5, 6, 7, 8), now_s=1.0), views) == {"b": 0.5}
    # A request with block hashes is neither scored by nor recorded in the approximate index.
    scorer.placed(_req(block_hashes=(9,), chunk_hashes=(9,)), views[0])
    assert approx.runs([9], 1.0) == {}
    assert scorer.score(_req(block_hashes=(5, 6), chunk_hashes=(5, 6)), views) == {"a": 1.0}


@pytest.mark.parametrize(("block_size_tokens", "best"), [
    (16, "a"),  # b's 96 tokens in flight are 6 blocks, more than the 4 a must prefill
    (32, "b"),  # in the model's larger blocks they are 3
])
def test_cost_counts_blocks_of_the_requests_model(block_size_tokens: int, best: str) -> None:
    precise = PrefixIndex(100)
    precise.apply_events(B, [_stored(1, 2, 3, 4)])
    scorer = Cost(_holdings(precise), ApproxIndex(100, 60.0), CostParams(),
                  {"m": ModelConfig(block_size_tokens=block_size_tokens)})
    scores = scorer.score(_req(block_hashes=(1, 2, 3, 4), prompt_tokens=64),
                          [_view("a"), _view("b", in_flight_tokens=96)])
    assert "ab"[scores.index(max(scores))] == best


# --- registry and profiles --------------------------------------------------------------

def _state() -> PluginState:
    return PluginState.from_config(decode_config({}, {}).scheduler)


@pytest.mark.parametrize(("profile", "names"), [
    (ProfileConfig(filters=("healthy", "fresh")), "unknown filter `fresh`"),
    (ProfileConfig(scorers=(ScorerRef(name="prefix", weight=1.0),)), "unknown scorer `prefix`"),
    (ProfileConfig(scorers=(ScorerRef(name="healthy", weight=1.0),)), "unknown scorer `healthy`"),
    (ProfileConfig(picker="best"), "unknown picker `best`"),
    (ProfileConfig(scorers=(ScorerRef(name="queue-depth"),)), "`queue-depth` has no weight"),
    (ProfileConfig(scorers=(ScorerRef(name="queue-depth", weight=0.0),)), "positive weight"),
])
def test_bad_profiles_are_startup_errors_naming_the_plugin(profile, names) -> None:
    with pytest.raises(ConfigError, match=names) as caught:
        build_profile("mine", profile, _state())
    assert "`mine`" in caught.value.message


def test_every_default_profile_builds_and_the_active_one_must_exist() -> None:
    cfg = decode_config({}, {}).scheduler
    assert set(build_profiles(cfg, _state())) == {
        "least-load", "round-robin", "prefix-approx", "prefix-precise", "cost"}
    bad = decode_config({"scheduler": {"profile": "fastest"}}, {}).scheduler
    with pytest.raises(ConfigError, match="`fastest` is not defined"):
        build_profiles(bad, _state())
    typo = decode_config({"scheduler": {"profiles": {
        "least-load": {"scorers": [{"name": "in-flight-requests", "weight": 1.0}]},
        "unused": {"picker": "nope"}}}}, {}).scheduler
    with pytest.raises(ConfigError, match="unknown picker `nope`"):
        build_profiles(typo, _state())


# --- profile: lists, sparse answers, explanations, the filter cache ------------------------

class _Fixed:
    """A scorer answering what it was given, whatever the request."""

    def __init__(self, name: str, answer: list[float] | dict[ReplicaId, float]) -> None:
        self.name, self.answer = name, answer

    def score(self, req: SchedRequest, replicas: list[ReplicaView]):
        return self.answer


@pytest.mark.parametrize(("answers", "totals"), [
    ([([0.5, 1.0, 0.0], 1.0)], [0.5, 1.0, 0.0]),
    ([([0.5, 1.0, 0.0], 2.0), ([1.0, 0.0, 0.5], 1.0)], [2.0, 2.0, 0.5]),
    ([({B: 1.0, C: 0.5}, 3.0)], [0.0, 3.0, 1.5]),                         # sparse only
    ([({A: 1.0, ReplicaId("gone"): 1.0}, 1.0), ([0.0, 1.0, 1.0], 0.5)],   # not a candidate
     [1.0, 0.5, 0.5]),
    ([({}, 1.0), ([1.0, 1.0, 1.0], 1.0), ([0.0, 0.5, 1.0], 2.0)], [1.0, 2.0, 3.0]),
])
def test_profile_adds_dense_and_sparse_answers(answers, totals) -> None:
    scorers = [WeightedScorer(_Fixed(f"s{i}", answer), weight)
               for i, (answer, weight) in enumerate(answers)]
    profile = Profile("p", [Healthy()], scorers, MaxScore())
    views = [_view("a"), _view("b"), _view("c"), _view("d", healthy=False)]
    decision = profile.decide(_req(), views, random.Random(1))
    assert decision.candidates == [A, B, C] and decision.totals == pytest.approx(totals)
    explained = decision.explain()
    assert explained["filtered_out"] == {"healthy": ["d"]}
    for i, rid in enumerate(decision.candidates):
        entry = explained["candidates"][rid]
        assert entry["total"] == pytest.approx(totals[i])
        assert entry["scores"] == pytest.approx({
            f"s{k}": answer[i] if isinstance(answer, list) else answer.get(rid, 0.0)
            for k, (answer, _) in enumerate(answers)})


def test_profile_rejects_a_dense_answer_of_the_wrong_length() -> None:
    profile = Profile("p", [], [WeightedScorer(_Fixed("short", [1.0]), 1.0)], MaxScore())
    with pytest.raises(ValueError, match="`short` answered 1 scores for 2 candidates"):
        profile.decide(_req(), [_view("a"), _view("b")], random.Random(1))


@pytest.mark.parametrize(("versions", "expected"), [
    ((None, None), [["a", "b"], ["b"]]),  # no version: every decision filters afresh
    ((1, 1), [["a", "b"], ["a", "b"]]),   # the same version: the first result is reused
    ((1, 2), [["a", "b"], ["b"]]),        # a new version: filtered again
])
def test_profile_reuses_state_filters_per_model_and_version(versions, expected) -> None:
    profile = Profile("p", [Healthy(), NotExcluded()], [], MaxScore())
    views = [_view("a"), _view("b")]
    kept = []
    for version in versions:
        kept.append(profile.decide(_req(), views, random.Random(1), version).candidates)
        views[0].healthy = False
    assert kept == expected
    # A request's own exclusions are applied after the cached filters, every time.
    excluded = profile.decide(_req(exclude=frozenset({"b"}), model="m"), views,
                              random.Random(1), versions[-1])
    assert excluded.candidates == [ReplicaId(r) for r in expected[-1] if r != "b"]
    assert excluded.filtered_out.get("not-excluded") == ["b"]
