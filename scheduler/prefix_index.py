"""Which replica holds which KV block: the precise prefix index.

`ReplicaBits` maps a hash to a bitmask of replica slots, so matching one
request against 64 replicas costs one dict lookup per block, not one per block
and replica (a gap at any block ends a replica's run, so each block up to the
longest run is looked at). `ReplicaHashSets` adds an LRU per replica capped at
its KV capacity in blocks, so the index stays bounded even when a BlockRemoved
event is lost.

`PrefixIndex` applies vLLM's KV events (BlockStored / BlockRemoved /
AllBlocksCleared) per replica and answers the longest run of a request's block
hashes, from block 0 and without a gap, that each replica holds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
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
        """Holds `keys` on the replica, the last of them most recently used."""
        slot = self._slot(replica_id)
        lru, keys = slot.lru, list(keys)
        new = [key for key in keys if key not in lru]
        held_before = len(lru)
        # Bulk calls keep the per-key work in C: insert the new keys, then move
        # every key to the recent end in order.
        lru.update(zip(new, repeat(None)))
        consume(map(lru.move_to_end, keys))
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
        """The run length from keys[0] of every replica holding at least keys[0]."""
        # All replicas at once, in C: the running AND of the keys' holder masks
        # (cut where it reaches 0) only loses bits, so a replica's run is the
        # length of the leading part of `cumulative` that has its bit.
        masks = map(self._holders.get, keys, repeat(0))
        cumulative = list(takewhile(bool, accumulate(masks, and_)))
        if not cumulative:
            return {}
        return {rid: bisect_left(cumulative, True, key=lambda mask, bit=bit: not mask & bit)
                for bit, rid in self._replicas(cumulative[0])}

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
