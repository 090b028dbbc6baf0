"""The approximate prefix index: where the scheduler itself sent each prompt chunk.

Used when a replica sends no KV events (or the prompt was not tokenized). A
prompt is cut into fixed-size byte chunks and each chunk is named by a hash
chained over everything before it, so equal hashes mean equal prefixes. The
chunks of each placed request are recorded against the chosen replica with a
TTL (a guess at how long the replica keeps them cached) in a per-replica LRU
sized to the replica's KV capacity, one chunk standing for about one block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from scheduler.framework import ReplicaId
from scheduler.prefix_index import ReplicaHashSets


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


class ApproxIndex:
    """Per-replica LRU of chunk hashes with a TTL."""

    def __init__(self, default_capacity_blocks: int, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_s = ttl_s
        self._sets = ReplicaHashSets(default_capacity_blocks)

    def size_blocks(self) -> int:
        return self._sets.size_blocks()

    def replica_blocks(self, replica_id: ReplicaId) -> int:
        return self._sets.replica_blocks(replica_id)

    def set_capacity(self, replica_id: ReplicaId, capacity_blocks: int) -> None:
        self._sets.set_capacity(replica_id, capacity_blocks)

    def drop(self, replica_id: ReplicaId) -> None:
        self._sets.drop(replica_id)

    def record(self, replica_id: ReplicaId, keys: Sequence[int], now_s: float) -> None:
        self._sets.expire(replica_id, now_s)
        # Tail first, so the LRU evicts a prompt's tail before its head and what
        # is left of a prompt is still a prefix.
        self._sets.add_many(replica_id, reversed(keys), now_s + self.ttl_s)

    def longest_prefix(self, keys: Sequence[int], replica_ids: Iterable[ReplicaId],
                       now_s: float) -> dict[ReplicaId, int]:
        overlap = dict.fromkeys(replica_ids, 0)
        for rid, matched in self._sets.runs(keys).items():
            if rid in overlap:
                overlap[rid] = self._unexpired(rid, keys, matched, now_s)
        return overlap

    def _unexpired(self, replica_id: ReplicaId, keys: Sequence[int], matched: int,
                   now_s: float) -> int:
        # Expired entries are purged lazily (on record). Along a held prefix the
        # expiry times never increase (recording a block re-records everything
        # before it), so trimming expired blocks off the end leaves the valid run.
        while matched:
            expires_at_s = self._sets.stamp(replica_id, keys[matched - 1])
            if expires_at_s is not None and expires_at_s > now_s:
                break
            matched -= 1
        return matched
