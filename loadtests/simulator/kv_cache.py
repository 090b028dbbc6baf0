"""The KV cache as vLLM's v1 BlockPool keeps it: a fixed number of blocks,
reference counts, a prefix cache from block digest to block, and a free
queue that doubles as the LRU eviction order.

Block 0 is vLLM's null block and never holds tokens, so usage counts the
other blocks. A freed block keeps its digest and stays a cache hit until it
is reused; reusing it evicts it (BlockRemoved). Blocks are announced
(BlockStored) when they become full, and hits are never re-announced.
Pure: no I/O and no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from scheduler.kv_events import (
    FULL_ATTENTION,
    MEDIUM_GPU,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    KVCacheEvent,
)

NULL_BLOCK_ID = 0
# The one KV-cache group a plain decoder-only model has.
GROUP_IDX = 0


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    # Set while the block is full and findable in the prefix cache.
    digest: bytes | None = None


class BlockPool:
    """Blocks of one replica. `event_hash` turns a digest into the hash KV events
    carry; None turns events off."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_caching: bool = True,
        event_hash: Callable[[bytes], ExternalBlockHash] | None = None,
    ) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a block pool needs at least 2 blocks of at least 1 token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Front is evicted first. Ordered by id at start, like vLLM's queue.
        self._free: OrderedDict[int, Block] = OrderedDict(
            (block.block_id, block) for block in self._blocks[1:]
        )
        # Several blocks may hold the same digest (computed concurrently); the first is served.
        self._cached: dict[bytes, dict[int, Block]] = {}
        self._event_hash = event_hash
        self._events: list[KVCacheEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._cached.values())

    def usage(self) -> float:
        """Share of blocks held by live requests; cached-but-free blocks count as free."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def longest_hit(self, digests: Sequence[bytes], max_blocks: int) -> list[Block]:
        """Cached blocks for the longest run of `digests` from the first, at most `max_blocks`."""
        hit: list[Block] = []
        if not self.enable_caching:
            return hit
        for digest in digests[:max_blocks]:
            blocks = self._cached.get(digest)
            if not blocks:
                break
            hit.append(next(iter(blocks.values())))
        return hit

    def blocks_to_take(self, hit: Iterable[Block], new_blocks: int) -> int:
        """Free-queue blocks an allocation of `new_blocks` after touching `hit` consumes."""
        return new_blocks + sum(1 for block in hit if block.ref_cnt == 0)

    def touch(self, blocks: Iterable[Block]) -> None:
        """A request reuses these cached blocks: they leave the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, count: int) -> list[Block]:
        """Takes `count` blocks from the front of the free queue, evicting their digests."""
        if count > len(self._free):
            raise ValueError(f"cannot allocate {count} blocks, {len(self._free)} free")
        taken: list[Block] = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def free(self, blocks_in_eviction_order: Iterable[Block]) -> None:
        """Releases one reference to each block; unreferenced ones join the back of the queue."""
        for block in blocks_in_eviction_order:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_blocks(
        self,
        blocks: Sequence[Block],
        digests: Sequence[bytes],
        token_ids: Sequence[int],
        first: int,
        end: int,
        cache_salt: str | None = None,
    ) -> None:
        """Makes blocks[first:end] findable by their digests and announces them.

        `digests` and `token_ids` are the request's; block i holds tokens
        [i * block_size, (i + 1) * block_size).
        """
        if not self.enable_caching or first >= end:
            return
        for index in range(first, end):
            block, digest = blocks[index], digests[index]
            block.digest = digest
            self._cached.setdefault(digest, {})[block.block_id] = block
        if self._event_hash is None:
            return
        to_event = self._event_hash
        size = self.block_size
        self._events.append(BlockStored(
            block_hashes=[to_event(digest) for digest in digests[first:end]],
            parent_block_hash=to_event(digests[first - 1]) if first > 0 else None,
            token_ids=list(token_ids[first * size : end * size]),
            block_size=size,
            lora_id=None,
            medium=MEDIUM_GPU,
            lora_name=None,
            # vLLM lists one extra-keys entry per block, None for plain text;
            # a request's cache_salt, untagged, in its first block's.
            extra_keys=[(cache_salt,) if index == 0 and cache_salt else None
                        for index in range(first, end)],
            group_idx=GROUP_IDX,
            kv_cache_spec_kind=FULL_ATTENTION,
        ))

    def take_events(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events

    def _evict(self, block: Block) -> None:
        if block.digest is None:
            return
        holders = self._cached.get(block.digest)
        if holders is not None and holders.pop(block.block_id, None) is not None:
            if not holders:
                del self._cached[block.digest]
            if self._event_hash is not None:
                self._events.append(BlockRemoved(
                    block_hashes=[self._event_hash(block.digest)],
                    medium=MEDIUM_GPU,
                    group_idx=GROUP_IDX,
                ))
        block.digest = None
