"""Unit tests of the prefix indexes' structures: bounds, eviction order,
capacity changes, generations and the bisection of the approximate index
against a plain linear reading. Pure; seeded randomness; time passed in."""

from __future__ import annotations

import random

import pytest

from scheduler.approx_index import GENERATIONS, ApproxIndex, MarkIndex
from scheduler.framework import ReplicaId
from scheduler.prefix_index import ReplicaHashSets

A, B = ReplicaId("a"), ReplicaId("b")
# The approximate index, and the one that puts every key in the shared table:
# the same answers.
KINDS = pytest.mark.parametrize("kind", [ApproxIndex, MarkIndex])


def _holder_pairs(index: ReplicaHashSets) -> int:
    """(key, replica) pairs in the shared hash -> bitmask table."""
    return sum(mask.bit_count() for mask in index._holders.values())


def _listed(index: ApproxIndex) -> int:
    """Chunks held, each checked to be listed in the generation that holds it."""
    held = 0
    for replica in index._replicas_by_id.values():
        lists = {g.serial: set(g.keys) for g in replica.generations}
        assert all(key in lists[serial] for key, serial in replica.generation_of.items())
        held += len(replica.generation_of)
    return held


# --- precise: LRU sets -------------------------------------------------------------------

@pytest.mark.parametrize(("capacity", "adds", "held", "evicted"), [
    (4, [[1, 2, 3]], [1, 2, 3], 0),
    (4, [[1, 2, 3], [1, 1, 4]], [1, 2, 3, 4], 0),         # a repeat counts once
    (3, [[1, 2, 3], [4]], [1, 2, 4], 1),                  # least recent goes first: 3, the tail
    (3, [[4], [1, 2, 3]], [1, 2, 3], 1),
    (3, [[1, 2, 3], [1], [4, 5]], [1, 4, 5], 2),          # a touch makes 1 recent
    (2, [[1, 2, 3, 4, 5]], [1, 2], 3),                    # one add larger: its head stays
])
def test_lru_sets_hold_the_most_recent_up_to_capacity(capacity, adds, held, evicted) -> None:
    sets = ReplicaHashSets(capacity)
    for keys in adds:
        sets.add_many(A, keys)
    assert sorted(sets._slots[A].lru) == held
    assert sets.size_blocks() == sets.replica_blocks(A) == len(held) == _holder_pairs(sets)
    assert sets.evicted_blocks == evicted


@pytest.mark.parametrize(("capacity", "held", "runs"), [
    (10, [1, 2, 3, 4], {A: 4, B: 2}),
    (2, [1, 2], {A: 2, B: 2}),   # tail first: what is left is still a prefix
    (1, [1], {A: 1, B: 2}),
])
def test_lru_sets_shrink_to_a_new_capacity(capacity: int, held: list[int], runs) -> None:
    sets = ReplicaHashSets(10)
    sets.add_many(A, [1, 2, 3, 4])
    sets.add_many(B, [1, 2])
    sets.set_capacity(A, capacity)
    assert sorted(sets._slots[A].lru) == held
    assert sets.runs([1, 2, 3, 4]) == runs
    assert sets.size_blocks() == len(held) + 2 == _holder_pairs(sets)


def _linear_runs(index: ReplicaHashSets, keys: list[int]) -> dict[ReplicaId, int]:
    """Each replica's run read block by block, stopping at its first gap."""
    runs = {}
    for rid, slot in index._slots.items():
        run = next((i for i, key in enumerate(keys) if key not in slot.lru), len(keys))
        if run:
            runs[rid] = run
    return runs


@pytest.mark.parametrize("seed", range(8))
def test_precise_bisection_equals_a_linear_reading_on_prefix_closed_caches(seed: int) -> None:
    """Replicas store chains of a few shared trees and evict as vLLM does
    (tail first, through capacity or BlockRemoved of a chain's last blocks),
    so every cache stays prefix-closed and bisection reads what a walk reads."""
    rng = random.Random(seed)
    replicas = [ReplicaId(f"r{i}") for i in range(rng.choice([3, 8, 64]))]
    index = ReplicaHashSets(default_capacity_blocks=rng.choice([16, 64, 1_000]))
    stored: dict[ReplicaId, list[list[int]]] = {rid: [] for rid in replicas}
    for _ in range(300):
        query = _chain(rng.randrange(3), rng.randrange(1, 60), rng)
        assert index.runs(query) == _linear_runs(index, query)
        rid = rng.choice(replicas)
        if rng.random() < 0.2 and stored[rid]:
            chain = stored[rid].pop(rng.randrange(len(stored[rid])))
            for key in reversed(chain[rng.randrange(len(chain)):]):
                if not any(key in other for other in stored[rid]):
                    index.remove(rid, key)
        else:
            prompt = _chain(rng.randrange(3), rng.randrange(1, 60), rng)
            index.add_many(rid, prompt)
            stored[rid].append(prompt)
    assert index.size_blocks() == _holder_pairs(index)


@pytest.mark.parametrize(("held", "keys", "bisected", "walked"), [
    ({A: [1, 2, 4, 5]}, [1, 2, 3, 4, 5], {A: 5}, {A: 2}),  # the gap at block 2 is not seen
    ({A: [1, 2, 4]}, [1, 2, 3, 4, 5], {A: 2}, {A: 2}),     # unless bisection lands on it
    ({A: [1, 2, 3, 4, 6, 7, 8, 9], B: [1]}, list(range(1, 10)),
     {A: 4, B: 1}, {A: 4, B: 1}),                          # the first end found is kept
    ({A: [1, 2, 3], B: [1, 2]}, [1, 2, 3, 4, 5], {A: 3, B: 2}, {A: 3, B: 2}),
])
def test_precise_bisection_can_read_past_a_gap(held, keys, bisected, walked) -> None:
    """Where a cache is not prefix-closed (sliding-window models, whose blocks
    vLLM frees ancestors first, or missed events), a match can look longer than
    vLLM would hit."""
    index = ReplicaHashSets(100)
    for rid, blocks in held.items():
        index.add_many(rid, blocks)
    assert index.runs(keys) == bisected
    assert _linear_runs(index, keys) == walked


# --- approximate: generations -------------------------------------------------------------

@KINDS
def test_approx_rerecording_within_a_generation_adds_nothing(kind: type[ApproxIndex]) -> None:
    index = kind(default_capacity_blocks=1_000, ttl_s=80.0)
    index.record(A, [1, 2, 3], now_s=0.0)
    index.record(A, [1, 2, 3, 4], now_s=1.0)
    generations = index._replicas_by_id[A].generations
    assert [g.keys for g in generations] == [[1, 2, 3, 4]]
    index.record(A, [1, 2], now_s=80.0 / GENERATIONS)  # the generation's span is over
    assert [g.keys for g in generations] == [[1, 2, 3, 4], [1, 2]]
    assert index.replica_blocks(A) == 4 == _listed(index)


@pytest.mark.parametrize(("now_s", "expected"), [
    (9.9, {A: 4}),
    (10.0, {A: 2}),   # the first generation expired; [1, 2] were recorded again at 5
    (14.9, {A: 2}),
    (15.0, {}),
])
@KINDS
def test_approx_generations_expire_oldest_first(kind: type[ApproxIndex], now_s: float,
                                                expected: dict) -> None:
    index = kind(default_capacity_blocks=1_000, ttl_s=10.0)
    index.record(A, [1, 2, 3, 4], now_s=0.0)
    index.record(A, [1, 2], now_s=5.0)
    assert index.runs([1, 2, 3, 4], now_s) == expected
    assert index.replica_blocks(A) == sum(expected.values()) == _listed(index)


@pytest.mark.parametrize(("capacity", "records", "runs_of", "expected"), [
    # Capacity 8: one key per generation at most, so every record opens one.
    (8, [[1, 2, 3], [7, 8, 9, 10, 11, 12]], [1, 2, 3], 2),   # 3 (a tail) goes first
    (8, [[1, 2, 3], [1, 2, 3, 4], [7, 8, 9, 10, 11]], [1, 2, 3, 4], 3),
    (4, [[1, 2, 3, 4, 5, 6]], [1, 2, 3, 4, 5, 6], 4),       # larger than the capacity
    (16, [[1, 2], [3, 4], [1, 2, 5]], [1, 2, 5], 3),
    (8, [[1, 1, 2], list(range(7, 16))], [1, 2], 0),  # a key repeated in a prompt
])
@KINDS
def test_approx_evicts_the_oldest_generation_tail_first(kind: type[ApproxIndex], capacity,
                                                        records, runs_of, expected) -> None:
    index = kind(default_capacity_blocks=capacity, ttl_s=100.0)
    for step, keys in enumerate(records):
        index.record(A, keys, now_s=float(step))
    assert index.runs(runs_of, now_s=10.0).get(A, 0) == expected
    assert index.replica_blocks(A) <= capacity
    assert index.replica_blocks(A) == _listed(index)


@KINDS
def test_approx_capacity_change_and_drop(kind: type[ApproxIndex]) -> None:
    index = kind(default_capacity_blocks=100, ttl_s=100.0)
    index.record(A, [1, 2, 3, 4, 5], now_s=0.0)
    index.record(B, [1, 2], now_s=0.0)
    index.set_capacity(A, 3)
    assert index.runs([1, 2, 3, 4, 5], 1.0) == {A: 3, B: 2}
    index.drop(A)
    assert index.runs([1, 2, 3], 1.0) == {B: 2} and index.size_blocks() == 2
    index.record(ReplicaId("c"), [1], now_s=1.0)  # reuses A's slot
    assert index.runs([1, 2], 1.0) == {B: 2, ReplicaId("c"): 1}
    if kind is MarkIndex:
        assert _holder_pairs(index) == index.size_blocks()


def _chain(parent: int, length: int, rng: random.Random) -> list[int]:
    # Chained like chunk hashes: a chunk's key depends on everything before it.
    keys, key = [], parent
    for _ in range(length):
        key = hash((key, rng.randrange(3)))
        keys.append(key)
    return keys


@pytest.mark.parametrize("seed", range(6))
@KINDS
def test_approx_bisection_equals_a_linear_reading(kind: type[ApproxIndex], seed: int) -> None:
    """On chained prompts the index stays prefix-closed, so the bisected runs
    equal the longest run of held chunks read one by one."""
    rng = random.Random(seed)
    replicas = [ReplicaId(f"r{i}") for i in range(5)]
    index = kind(default_capacity_blocks=rng.choice([8, 40, 200]), ttl_s=30.0)
    for step in range(300):
        now_s = step * 0.5
        if step % 50 == 49:
            index.set_capacity(rng.choice(replicas), rng.choice([5, 20, 200]))
        prompt = _chain(rng.randrange(4), rng.randrange(1, 40), rng)
        held = {rid: index._replicas_by_id[rid].generation_of
                for rid in replicas if rid in index._replicas_by_id}
        runs = index.runs(prompt, now_s)
        linear = {}
        for rid, keys in held.items():
            run = next((i for i, key in enumerate(prompt) if key not in keys), len(prompt))
            if run:
                linear[rid] = run
        assert runs == linear
        index.record(rng.choice(replicas), prompt, now_s)
    assert index.size_blocks() == _listed(index)
    if kind is MarkIndex:
        assert _holder_pairs(index) == index.size_blocks()
