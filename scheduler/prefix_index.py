"""Which replica holds which KV block: the precise prefix index.

`ReplicaHashSets` is the shared structure (also used by approx_index): a hash
maps to a bitmask of replica slots, so matching one request against 64
replicas costs one dict lookup per block, not one per block and replica. Each
replica also keeps its hashes in an LRU capped at its KV capacity in blocks,
so the index stays bounded even when a BlockRemoved event is lost.

`PrefixIndex` applies vLLM's KV events (BlockStored / BlockRemoved /
AllBlocksCleared) per replica and answers the longest run of a request's block
hashes, from block 0, that each replica holds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat, takewhile
from operator import and_

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


@dataclass(slots=True)
class _Slot:
    bit: int
    capacity_blocks: int
    # hash -> stamp (expiry time for the approximate index), least recent first.
    lru: OrderedDict[int, float] = field(default_factory=OrderedDict)


class ReplicaHashSets:
    """hash -> replicas holding it, bounded per replica by LRU eviction."""

    def __init__(self, default_capacity_blocks: int) -> None:
        if default_capacity_blocks < 1:
            raise ValueError("default_capacity_blocks must be at least 1")
        self.default_capacity_blocks = default_capacity_blocks
        self._holders: dict[int, int] = {}
        self._slots: dict[ReplicaId, _Slot] = {}
        self._slot_ids: dict[int, ReplicaId] = {}
        self._free_bits: list[int] = []
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
        self._evict_over_capacity(replica_id, slot)

    def add_many(self, replica_id: ReplicaId, keys: Iterable[int], stamp: float = 0.0) -> None:
        slot = self._slot(replica_id)
        lru, holders, bit = slot.lru, self._holders, slot.bit
        for key in keys:
            if key in lru:
                lru.move_to_end(key)
            else:
                self._entries += 1
                holders[key] = holders.get(key, 0) | bit
            lru[key] = stamp
        if len(lru) > slot.capacity_blocks:
            self._evict_over_capacity(replica_id, slot)

    def remove(self, replica_id: ReplicaId, key: int) -> None:
        slot = self._slots.get(replica_id)
        if slot is not None and slot.lru.pop(key, None) is not None:
            self._unlink(slot, key)

    def clear(self, replica_id: ReplicaId) -> None:
        slot = self._slots.get(replica_id)
        if slot is None:
            return
        for key in slot.lru:
            self._unlink(slot, key)
        slot.lru.clear()

    def drop(self, replica_id: ReplicaId) -> None:
        """Forgets a replica that left the registry and frees its slot."""
        if replica_id not in self._slots:
            return
        self.clear(replica_id)
        slot = self._slots.pop(replica_id)
        del self._slot_ids[slot.bit]
        self._free_bits.append(slot.bit)

    def expire(self, replica_id: ReplicaId, now_s: float) -> int:
        """Drops entries whose stamp (an expiry time) is not after `now_s`.
        Stamps only grow within a replica, so the expired ones are at the front."""
        slot = self._slots.get(replica_id)
        if slot is None:
            return 0
        lru = slot.lru
        expired = 0
        while lru:
            key, expires_at_s = next(iter(lru.items()))
            if expires_at_s > now_s:
                break
            del lru[key]
            self._unlink(slot, key)
            expired += 1
        return expired

    def longest_prefix(self, keys: Sequence[int],
                       replica_ids: Iterable[ReplicaId]) -> dict[ReplicaId, int]:
        """For each replica, how many of `keys` it holds from keys[0] on without a gap."""
        overlap = dict.fromkeys(replica_ids, 0)
        for rid, matched in self.runs(keys).items():
            if rid in overlap:
                overlap[rid] = matched
        return overlap

    def runs(self, keys: Sequence[int]) -> dict[ReplicaId, int]:
        """The run length from keys[0] of every replica holding at least keys[0]."""
        # All replicas at once, in C: the running AND of the keys' holder masks
        # (cut where it reaches 0) only loses bits, so a replica's run is the
        # length of the leading part of `cumulative` that has its bit.
        masks = map(self._holders.get, keys, repeat(0))
        cumulative = list(takewhile(bool, accumulate(masks, and_)))
        runs: dict[ReplicaId, int] = {}
        bits = cumulative[0] if cumulative else 0
        while bits:
            low = bits & -bits
            runs[self._slot_ids[low]] = bisect_left(
                cumulative, True, key=lambda mask, bit=low: not mask & bit)
            bits ^= low
        return runs

    def stamp(self, replica_id: ReplicaId, key: int) -> float | None:
        slot = self._slots.get(replica_id)
        return None if slot is None else slot.lru.get(key)

    def _slot(self, replica_id: ReplicaId) -> _Slot:
        slot = self._slots.get(replica_id)
        if slot is None:
            bit = self._free_bits.pop() if self._free_bits else 1 << len(self._slots)
            slot = _Slot(bit, self.default_capacity_blocks)
            self._slots[replica_id] = slot
            self._slot_ids[bit] = replica_id
        return slot

    def _evict_over_capacity(self, replica_id: ReplicaId, slot: _Slot) -> None:
        while len(slot.lru) > slot.capacity_blocks:
            key, _ = slot.lru.popitem(last=False)
            self._unlink(slot, key)
            self.evicted_blocks += 1

    def _unlink(self, slot: _Slot, key: int) -> None:
        self._entries -= 1
        remaining = self._holders.get(key, 0) & ~slot.bit
        if remaining:
            self._holders[key] = remaining
        else:
            self._holders.pop(key, None)


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
