"""The approximate prefix index: where the scheduler itself sent each prompt chunk.

Used when a replica sends no KV events (or the prompt was not tokenized). A
prompt is cut into fixed-size byte chunks and each chunk is named by a hash
chained over everything before it, so equal hashes mean equal prefixes. The
chunks of each placed request are recorded against the chosen replica with a
TTL (a guess at how long the replica keeps them cached), bounded per replica
by its KV capacity, one chunk standing for about one block.

Recency is kept per generation rather than per chunk: a replica's chunks go
into its current generation, a new one opens every `ttl_s / GENERATIONS` (or
after `capacity / GENERATIONS` chunks), and the oldest generation expires or
is evicted first. Re-recording a prompt that is already in the current
generation then costs one small-dict lookup per chunk, not an LRU move.

Chains make the index prefix-closed: every record of chunk k also records
chunks 0..k-1, so they sit in a generation at least as new, and eviction
takes a generation's chunks last-recorded first. So a replica holding chunk k
holds the chunks before it: its run is found by bisection in a few lookups,
and so is the part of a prompt not yet in its current generation. Chunks are
kept per replica; only a prompt's first chunk goes into a table shared by the
fleet (first chunk -> bitmask of the replicas holding it), so recording a
prompt's new tail, on every decision, touches one replica's dict. (`MarkIndex`
puts every key in that table, for prompts held by many replicas.)
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat

from scheduler.framework import ReplicaId
from scheduler.prefix_index import ReplicaBits, consume

# Generations per TTL (and per capacity): expiry is late by at most ttl_s / GENERATIONS.
GENERATIONS = 8


def chunk_hashes(prompt: bytes, chunk_bytes: int, max_chunks: int) -> tuple[int, ...]:
    """Chained 64-bit hashes of the full `chunk_bytes`-sized chunks of `prompt`
    (a partial tail is left out, as vLLM leaves out a partial block)."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be at least 1")
    hashes: list[int] = []
    parent = b""
    for start in range(0, min(len(prompt) // chunk_bytes, max_chunks) * chunk_bytes,
                       chunk_bytes):
        parent = hashlib.blake2b(parent + prompt[start:start + chunk_bytes],
                                 digest_size=8).digest()
        hashes.append(int.from_bytes(parent, "big"))
    return tuple(hashes)


@dataclass(slots=True)
class _Generation:
    serial: int
    opened_at_s: float
    expires_at_s: float
    # In recording order; may repeat keys a newer generation took over.
    keys: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Replica:
    bit: int
    capacity_blocks: int
    # key -> serial of the newest generation holding it: the replica's chunks.
    generation_of: dict[int, int] = field(default_factory=dict)
    generations: deque[_Generation] = field(default_factory=deque)
    next_serial: int = 0


class ApproxIndex(ReplicaBits):
    """Per-replica chunk hashes with a TTL, bounded by the replica's capacity."""

    def __init__(self, default_capacity_blocks: int, ttl_s: float) -> None:
        if default_capacity_blocks < 1:
            raise ValueError("default_capacity_blocks must be at least 1")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        super().__init__()
        self.default_capacity_blocks = default_capacity_blocks
        self.ttl_s = ttl_s
        self._replicas_by_id: dict[ReplicaId, _Replica] = {}
        self.evicted_blocks = 0

    def size_blocks(self) -> int:
        return sum(len(r.generation_of) for r in self._replicas_by_id.values())

    def replica_blocks(self, replica_id: ReplicaId) -> int:
        replica = self._replicas_by_id.get(replica_id)
        return 0 if replica is None else len(replica.generation_of)

    def set_capacity(self, replica_id: ReplicaId, capacity_blocks: int) -> None:
        replica = self._replica(replica_id)
        replica.capacity_blocks = max(1, capacity_blocks)
        self._evict_over_capacity(replica)

    def drop(self, replica_id: ReplicaId) -> None:
        replica = self._replicas_by_id.pop(replica_id, None)
        if replica is not None:
            self._unlink_gone(replica.bit, replica.generation_of)
            self._free_bit(replica_id)

    def record(self, replica_id: ReplicaId, keys: Sequence[int], now_s: float) -> None:
        replica = self._replica(replica_id)
        self._expire(replica, now_s)
        generation = self._current(replica, now_s)
        serial, generation_of = generation.serial, replica.generation_of
        # The leading part of `keys` already in the current generation needs nothing.
        lo, hi = -1, len(keys)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if generation_of.get(keys[mid]) == serial:
                lo = mid
            else:
                hi = mid
        # A key repeated within `keys` is listed twice; forgetting it counts it once.
        fresh = keys[hi:]
        if fresh:
            self._link_new(replica, fresh, hi == 0)
            generation_of.update(zip(fresh, repeat(serial)))
            generation.keys += fresh
        generation.expires_at_s = now_s + self.ttl_s
        self._evict_over_capacity(replica)

    def runs(self, keys: Sequence[int], now_s: float) -> dict[ReplicaId, int]:
        """The run length from keys[0] of every replica holding at least keys[0]
        and recorded within the TTL."""
        if not keys:
            return {}
        first, end = keys[0], len(keys)
        runs: dict[ReplicaId, int] = {}
        found = 0
        for _, rid in self._replicas(self._holders.get(first, 0)):
            replica = self._replicas_by_id[rid]
            self._expire(replica, now_s)
            held = replica.generation_of
            if first not in held:
                continue
            # keys[lo] is held, keys[hi] is not (or hi is the end).
            lo, hi = 0, end
            if found > 1:
                # The holders of a prompt mostly hold the same part of it: two
                # lookups check the run found last before any bisection.
                if keys[found - 1] not in held:
                    hi = found - 1
                elif found == end or keys[found] not in held:
                    lo, hi = found - 1, found
                else:
                    lo = found
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if keys[mid] in held:
                    lo = mid
                else:
                    hi = mid
            runs[rid] = found = hi
        return runs

    def longest_prefix(self, keys: Sequence[int], replica_ids: Sequence[ReplicaId],
                       now_s: float) -> dict[ReplicaId, int]:
        overlap = dict.fromkeys(replica_ids, 0)
        for rid, matched in self.runs(keys, now_s).items():
            if rid in overlap:
                overlap[rid] = matched
        return overlap

    def _replica(self, replica_id: ReplicaId) -> _Replica:
        replica = self._replicas_by_id.get(replica_id)
        if replica is None:
            replica = _Replica(self._new_bit(replica_id), self.default_capacity_blocks)
            self._replicas_by_id[replica_id] = replica
        return replica

    def _current(self, replica: _Replica, now_s: float) -> _Generation:
        generations = replica.generations
        if generations:
            current = generations[-1]
            if (now_s - current.opened_at_s < self.ttl_s / GENERATIONS
                    and len(current.keys) < max(1, replica.capacity_blocks // GENERATIONS)):
                return current
        current = _Generation(replica.next_serial, now_s, now_s + self.ttl_s)
        replica.next_serial += 1
        generations.append(current)
        # Stale repeats count towards no capacity; bound them by the generation count.
        while len(generations) > 2 * GENERATIONS:
            self._forget(replica, generations.popleft(), None)
        return current

    def _expire(self, replica: _Replica, now_s: float) -> None:
        generations = replica.generations
        while generations and generations[0].expires_at_s <= now_s:
            self._forget(replica, generations.popleft(), None)

    def _evict_over_capacity(self, replica: _Replica) -> None:
        generations = replica.generations
        while len(replica.generation_of) > replica.capacity_blocks:
            oldest = generations[0]
            self.evicted_blocks += self._forget(
                replica, oldest, len(replica.generation_of) - replica.capacity_blocks)
            if not oldest.keys:
                generations.popleft()

    def _forget(self, replica: _Replica, generation: _Generation, count: int | None) -> int:
        """Drops the last `count` keys recorded in `generation` (all when None);
        returns how many chunks the replica no longer holds."""
        keys = generation.keys
        cut = 0 if count is None else max(0, len(keys) - count)
        dropped = keys[cut:]
        del keys[cut:]
        generation_of, serial = replica.generation_of, generation.serial
        # Deduplicated: a key may be listed twice in one generation when `keys`
        # were not a chain (the bisection in record assumes one).
        gone = [key for key in dict.fromkeys(dropped) if generation_of.get(key) == serial]
        consume(map(generation_of.__delitem__, gone))
        self._unlink_gone(replica.bit, gone)
        return len(gone)

    def _link_new(self, replica: _Replica, fresh: Sequence[int], from_start: bool) -> None:
        """Links what the shared table keeps of `fresh` keys about to be recorded
        (`from_start`: they begin with the prompt's first): only a first key
        the replica does not hold yet."""
        if from_start and fresh[0] not in replica.generation_of:
            self._link(replica.bit, fresh[:1])

    def _unlink_gone(self, bit: int, keys: Iterable[int]) -> None:
        """Clears `bit` for those of `keys`, no longer held, that are first chunks it holds."""
        holders = self._holders
        self._unlink(bit, [key for key in keys if holders.get(key, 0) & bit])


class MarkIndex(ApproxIndex):
    """An approximate index whose every key, not only a prompt's first, is in
    the shared table (key -> bitmask of the replicas holding it): a run lookup
    bisects once for all holders instead of once per holder, at the price of a
    table update per key recorded or forgotten. It suits prompts with few keys
    held by many replicas: the pending marks of prompts just sent, which the
    `cost` profile, placing by load as much as by prefix, leaves on a dozen
    replicas per prompt within the TTL.

    Expired generations must be gone from the table before a lookup, so every
    replica's are dropped once the earliest expiry has passed (a lower bound
    kept at each record)."""

    def __init__(self, default_capacity_blocks: int, ttl_s: float) -> None:
        super().__init__(default_capacity_blocks, ttl_s)
        self._next_expiry_s = math.inf

    def record(self, replica_id: ReplicaId, keys: Sequence[int], now_s: float) -> None:
        super().record(replica_id, keys, now_s)
        self._next_expiry_s = min(self._next_expiry_s, now_s + self.ttl_s)

    def runs(self, keys: Sequence[int], now_s: float) -> dict[ReplicaId, int]:
        if now_s >= self._next_expiry_s:
            next_expiry_s = math.inf
            for replica in self._replicas_by_id.values():
                self._expire(replica, now_s)
                if replica.generations:
                    next_expiry_s = min(next_expiry_s, replica.generations[0].expires_at_s)
            self._next_expiry_s = next_expiry_s
        return self._held_runs(keys)

    def _link_new(self, replica: _Replica, fresh: Sequence[int], from_start: bool) -> None:
        held = replica.generation_of
        self._link(replica.bit, [key for key in fresh if key not in held])

    def _unlink_gone(self, bit: int, keys: Iterable[int]) -> None:
        self._unlink(bit, keys)
