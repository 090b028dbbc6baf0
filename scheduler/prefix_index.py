"""Which replica holds which KV block: the precise prefix index.

`ReplicaBits` maps a hash to a bitmask of replica slots, so one lookup tells
which of 64 replicas hold a block. `ReplicaHashSets` adds an LRU per replica
capped at its KV capacity in blocks, so the index stays bounded even when a
BlockRemoved event is lost.

Runs are found by bisection, assuming each replica's cached blocks are
prefix-closed: whoever holds a block holds its ancestors. vLLM keeps its cache
so (a request frees its blocks tail-first and a shared ancestor is freed after
its descendants, so eviction from the free queue's head never takes an
ancestor first, and a block is stored only after its parent). Then the
holders of block p shrink as p grows, and a request's runs cost a few lookups
per distinct run end rather than one per block: with a 1M-entry dict each
lookup is a cache miss. Where the assumption fails the match looks longer
than vLLM would hit: models with sliding-window attention, whose blocks vLLM
frees ancestors first, or an index that missed events. The LRU keeps to it:
a stored chain goes to the recent end first block last, so capacity eviction
takes its tail first.

`PrefixIndex` applies vLLM's KV events (BlockStored / BlockRemoved /
AllBlocksCleared) per replica and answers the longest run of a request's block
hashes, from block 0 and without a gap, that each replica holds.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat

from scheduler.block_hash import low64
from scheduler.framework import ReplicaId
from scheduler.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    KVCacheEvent,
)


def consume(calls: Iterator[object]) -> None:
    """Runs a lazy map of calls to the end in C (itertools' `consume` recipe)."""
    deque(calls, maxlen=0)


class ReplicaBits:
    """hash -> bitmask of the replica slots holding it; slots are reused."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}
        self._bits: dict[ReplicaId, int] = {}
        self._ids: dict[int, ReplicaId] = {}
        self._free_bits: list[int] = []

    def _new_bit(self, replica_id: ReplicaId) -> int:
        bit = self._free_bits.pop() if self._free_bits else 1 << len(self._bits)
        self._bits[replica_id] = bit
        self._ids[bit] = replica_id
        return bit

    def _free_bit(self, replica_id: ReplicaId) -> None:
        bit = self._bits.pop(replica_id)
        del self._ids[bit]
        self._free_bits.append(bit)

    def _link(self, bit: int, keys: Iterable[int]) -> None:
        holders = self._holders
        for key in keys:
            holders[key] = holders.get(key, 0) | bit

    def _unlink(self, bit: int, keys: Iterable[int]) -> None:
        holders, keep = self._holders, ~bit
        for key in keys:
            remaining = holders[key] & keep
            if remaining:
                holders[key] = remaining
            else:
                del holders[key]

    def _replicas(self, bits: int) -> Iterator[tuple[int, ReplicaId]]:
        """(bit, replica id) for each bit set in `bits`."""
        while bits:
            low = bits & -bits
            yield low, self._ids[low]
            bits ^= low

    def _held_runs(self, keys: Sequence[int]) -> dict[ReplicaId, int]:
        """The run length from keys[0] of every replica whose bit is set for
        keys[0], found by bisecting on the bitmasks: a few lookups per distinct
        run end, however many replicas hold the keys (each replica's keys
        prefix-closed; see the module docstring)."""
        if not keys:
            return {}
        get = self._holders.get
        first = get(keys[0], 0)
        if not first:
            return {}
        last = len(keys) - 1
        to_end = get(keys[last], 0) & first
        # Segments (lo, its holders, hi, its holders): the bits held at lo but
        # not at hi end their run in (lo, hi]. Left halves first, so run ends
        # come out in order and, where a gap breaks the assumption, a
        # replica's first end found is kept.
        ends: list[tuple[int, int]] = []
        segments = [(0, first, last, to_end)] if to_end != first else []
        while segments:
            lo, lo_mask, hi, hi_mask = segments.pop()
            if hi - lo == 1:
                ends.append((lo_mask & ~hi_mask, hi))
                continue
            mid = (lo + hi) // 2
            mid_mask = get(keys[mid], 0) & lo_mask
            if mid_mask != hi_mask:
                segments.append((mid, mid_mask, hi, hi_mask))
            if mid_mask != lo_mask:
                segments.append((lo, lo_mask, mid, mid_mask))
        ends.append((to_end, last + 1))
        runs: dict[ReplicaId, int] = {}
        for mask, run in ends:
            for _, rid in self._replicas(mask):
                runs.setdefault(rid, run)
        return runs


@dataclass(slots=True)
class _Slot:
    bit: int
    capacity_blocks: int
    lru: OrderedDict[int, None] = field(default_factory=OrderedDict)


class ReplicaHashSets(ReplicaBits):
    """hash -> replicas holding it, bounded per replica by LRU eviction."""

    def __init__(self, default_capacity_blocks: int) -> None:
        if default_capacity_blocks < 1:
            raise ValueError("default_capacity_blocks must be at least 1")
        super().__init__()
        self.default_capacity_blocks = default_capacity_blocks
        self._slots: dict[ReplicaId, _Slot] = {}
        self._entries = 0
        self.evicted_blocks = 0

    def size_blocks(self) -> int:
        """(replica, hash) pairs held: the figure to export as the index size."""
        return self._entries

    def replica_blocks(self, replica_id: ReplicaId) -> int:
        slot = self._slots.get(replica_id)
        return 0 if slot is None else len(slot.lru)

    def set_capacity(self, replica_id: ReplicaId, capacity_blocks: int) -> None:
        slot = self._slot(replica_id)
        slot.capacity_blocks = max(1, capacity_blocks)
        self._evict_over_capacity(slot)

    def add_many(self, replica_id: ReplicaId, keys: Iterable[int]) -> None:
        """Holds the chain `keys` on the replica, its first key most recently
        used, so capacity eviction takes the chain tail first."""
        slot = self._slot(replica_id)
        lru, keys = slot.lru, list(keys)
        new = [key for key in keys if key not in lru]
        held_before = len(lru)
        # Bulk calls keep the per-key work in C: insert the new keys, then move
        # every key to the recent end, last key first.
        lru.update(zip(new, repeat(None)))
        consume(map(lru.move_to_end, reversed(keys)))
        self._entries += len(lru) - held_before
        self._link(slot.bit, new)
        if len(lru) > slot.capacity_blocks:
            self._evict_over_capacity(slot)

    def remove(self, replica_id: ReplicaId, key: int) -> None:
        slot = self._slots.get(replica_id)
        if slot is not None and key in slot.lru:
            del slot.lru[key]
            self._entries -= 1
            self._unlink(slot.bit, (key,))

    def clear(self, replica_id: ReplicaId) -> None:
        slot = self._slots.get(replica_id)
        if slot is None:
            return
        self._unlink(slot.bit, slot.lru)
        self._entries -= len(slot.lru)
        slot.lru.clear()

    def drop(self, replica_id: ReplicaId) -> None:
        """Forgets a replica that left the registry and frees its slot."""
        if replica_id not in self._slots:
            return
        self.clear(replica_id)
        del self._slots[replica_id]
        self._free_bit(replica_id)

    def longest_prefix(self, keys: Sequence[int],
                       replica_ids: Iterable[ReplicaId]) -> dict[ReplicaId, int]:
        """For each replica, how many of `keys` it holds from keys[0] on without a gap."""
        overlap = dict.fromkeys(replica_ids, 0)
        for rid, matched in self.runs(keys).items():
            if rid in overlap:
                overlap[rid] = matched
        return overlap

    def runs(self, keys: Sequence[int]) -> dict[ReplicaId, int]:
        """The run length from keys[0] of every replica holding at least keys[0]
        (exact for prefix-closed caches; see the module docstring)."""
        return self._held_runs(keys)

    def _slot(self, replica_id: ReplicaId) -> _Slot:
        slot = self._slots.get(replica_id)
        if slot is None:
            slot = _Slot(self._new_bit(replica_id), self.default_capacity_blocks)
            self._slots[replica_id] = slot
        return slot

    def _evict_over_capacity(self, slot: _Slot) -> None:
        over = len(slot.lru) - slot.capacity_blocks
        if over <= 0:
            return
        popitem = slot.lru.popitem
        evicted = [popitem(last=False)[0] for _ in range(over)]
        self._unlink(slot.bit, evicted)
        self._entries -= over
        self.evicted_blocks += over


def event_key(block_hash: ExternalBlockHash) -> int:
    """The index key of a hash as an event carries it: the low 64 bits."""
    return block_hash if isinstance(block_hash, int) else low64(block_hash)


class PrefixIndex(ReplicaHashSets):
    """The precise index, fed by each replica's KV events."""

    def apply_events(self, replica_id: ReplicaId, events: Iterable[KVCacheEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                # Blocks offloaded to CPU or disk are not in the GPU prefix cache.
                if event.medium in (None, MEDIUM_GPU):
                    self.add_many(replica_id, map(event_key, event.block_hashes))
            elif isinstance(event, BlockRemoved):
                if event.medium in (None, MEDIUM_GPU):
                    for block_hash in event.block_hashes:
                        self.remove(replica_id, event_key(block_hash))
            elif isinstance(event, AllBlocksCleared):
                self.clear(replica_id)
