"""vLLM-style automatic prefix caching over full blocks of token ids.

Each full block is named by a chained hash of its parent's hash and its own
tokens, so a block hash stands for the whole prefix up to the block's end.
The cache is a bounded LRU of those hashes. The digest is our own encoding
(sha256 over the parent digest and little-endian uint32 token ids), not
vLLM's pickle-based one: it is reproducible, but not byte-identical.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

# Fixed root so the same tokens hash alike on every replica and every run.
ROOT_HASH = hashlib.sha256(b"switchyard-simulator-root").digest()


def block_hashes(token_ids: Sequence[int], block_size_tokens: int) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (a partial tail is skipped)."""
    hashes: list[bytes] = []
    parent = ROOT_HASH
    full_blocks = len(token_ids) // block_size_tokens
    for index in range(full_blocks):
        block = token_ids[index * block_size_tokens : (index + 1) * block_size_tokens]
        parent = hashlib.sha256(parent + struct.pack(f"<{len(block)}I", *block)).digest()
        hashes.append(parent)
    return hashes


def cacheable_prompt_blocks(prompt_tokens: int, block_size_tokens: int) -> int:
    """How many leading blocks of a prompt may be served from cache.

    vLLM always computes at least the prompt's last token (it needs its
    logits), so a hit never covers the whole prompt, even when the prompt is
    an exact number of blocks.
    """
    return max(prompt_tokens - 1, 0) // block_size_tokens


class PrefixCache:
    """A bounded LRU of block hashes; evicted_blocks counts what it dropped."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be at least 1")
        self.capacity_blocks = capacity_blocks
        self.evicted_blocks = 0
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def match(self, hashes: Sequence[bytes]) -> int:
        """Length of the longest cached run of `hashes` from the first; touches it."""
        matched = 0
        for block_hash in hashes:
            if block_hash not in self._blocks:
                break
            matched += 1
        self._touch(hashes[:matched])
        return matched

    def store(self, hashes: Sequence[bytes]) -> None:
        """Caches a chain of blocks, evicting least recently used ones beyond capacity."""
        self._touch(hashes)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
            self.evicted_blocks += 1

    def _touch(self, hashes: Sequence[bytes]) -> None:
        # Tail blocks become the least recent so eviction trims chains from the
        # end, as vLLM's free-block queue does; a chain's head stays reachable.
        for block_hash in reversed(hashes):
            self._blocks[block_hash] = None
            self._blocks.move_to_end(block_hash)
