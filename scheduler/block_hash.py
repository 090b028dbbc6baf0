"""vLLM's prefix-cache block hashes, reproduced bit for bit.

vLLM names every full block of a request's tokens by a chained digest,
`H((parent_digest or NONE_HASH, tuple(block_token_ids), extra_keys))`, where
NONE_HASH = H(seed): the seed is PYTHONHASHSEED when vLLM runs with it set,
otherwise "vllm-none-hash" for the two cryptographic algorithms reproduced
here. `H` is `--prefix-caching-hash-algo`:

- "sha256" (vLLM's default): sha256 of the pickled tuple.
- "sha256_cbor": sha256 of the tuple in canonical CBOR (language-neutral).

The xxhash variants seed NONE_HASH randomly per process, so no router can
reproduce them. KV events carry the low 64 bits of each digest (`low64`)
unless vLLM runs with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0.

Pure: callers pass the seed in; nothing here reads the environment.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, get_args

HashAlgo = Literal["sha256", "sha256_cbor"]
HASH_ALGOS: tuple[str, ...] = get_args(HashAlgo)
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
# vLLM pickles with pickle.HIGHEST_PROTOCOL, which is 5 on every Python it
# supports; pinning it keeps our digests from moving with the interpreter.
PICKLE_PROTOCOL = 5
# extra_keys of one block: LoRA name, multimodal ids, cache_salt, ... (None for plain text).
ExtraKeys = tuple[object, ...] | None

_UINT64_LIMIT = 1 << 64


def digest(algo: str, value: object) -> bytes:
    """vLLM's hash function `algo` applied to `value`."""
    if algo == "sha256":
        return hashlib.sha256(pickle.dumps(value, protocol=PICKLE_PROTOCOL)).digest()
    if algo == "sha256_cbor":
        return hashlib.sha256(canonical_cbor(value)).digest()
    raise ValueError(f"unsupported block hash algorithm {algo!r}; expected one of {HASH_ALGOS}")


@lru_cache(maxsize=16)
def none_hash(algo: str, seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    """The stand-in parent of every first block."""
    return digest(algo, seed)


def hash_block(
    algo: str,
    parent: bytes | None,
    block_token_ids: Sequence[int],
    extra_keys: ExtraKeys = None,
    *,
    seed: str = DEFAULT_NONE_HASH_SEED,
) -> bytes:
    """The digest of one full block; `parent` is the previous block's full digest."""
    # vLLM tests the parent for truthiness, so an empty digest also means "first block".
    chained = parent or none_hash(algo, seed)
    return digest(algo, (chained, tuple(block_token_ids), extra_keys))


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algo: str,
    extra_keys: ExtraKeys = None,
    *,
    seed: str = DEFAULT_NONE_HASH_SEED,
    parent: bytes | None = None,
) -> list[bytes]:
    """Digests of the full blocks of `token_ids` (a partial tail is not hashed).

    `extra_keys` applies to every block; `parent` continues an earlier chain.
    """
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(algo, parent, token_ids[start : start + block_size], extra_keys,
                            seed=seed)
        hashes.append(parent)
    return hashes


def cache_salt_keys(cache_salt: str | None) -> ExtraKeys:
    """vLLM's extra keys of a request's first block for its `cache_salt` (None
    without one): the salt, tagged, so salted and unsalted prompts never share
    a block."""
    return (("cache_salt", cache_salt),) if cache_salt else None


def prompt_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algo: str,
    *,
    seed: str = DEFAULT_NONE_HASH_SEED,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Digests of the full blocks of a request's prompt as vLLM computes them,
    its `cache_salt` in the first block's extra keys."""
    if len(token_ids) < block_size or not cache_salt:
        return block_hashes(token_ids, block_size, algo, seed=seed)
    first = hash_block(algo, None, token_ids[:block_size], cache_salt_keys(cache_salt), seed=seed)
    return [first, *block_hashes(token_ids[block_size:], block_size, algo, seed=seed,
                                 parent=first)]


def low64(block_digest: bytes) -> int:
    """The unsigned int a KV event carries for a digest: its low 64 bits, big-endian."""
    return int.from_bytes(block_digest[-8:], "big")


def canonical_cbor(value: object) -> bytes:
    """Canonical CBOR (RFC 8949 core deterministic encoding) of the types a block
    hash input holds: None, bools, ints within 64 bits, bytes, str, tuples and lists."""
    out = bytearray()
    _encode(out, value)
    return bytes(out)


def _encode(out: bytearray, value: object) -> None:
    if value is None:
        out.append(0xF6)
    elif isinstance(value, bool):
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _head(out, 0, value)
        else:
            _head(out, 1, -1 - value)
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        _head(out, 2, len(raw))
        out += raw
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _head(out, 3, len(raw))
        out += raw
    elif isinstance(value, tuple | list):
        _head(out, 4, len(value))
        for item in value:
            _encode(out, item)
    else:
        raise TypeError(f"no canonical CBOR encoding here for {type(value).__name__}")


def _head(out: bytearray, major: int, argument: int) -> None:
    """A data item's head with the shortest argument encoding, as canonical CBOR requires."""
    if argument >= _UINT64_LIMIT:
        raise ValueError("integers beyond 64 bits are not part of a block hash input")
    major_bits = major << 5
    if argument < 24:
        out.append(major_bits | argument)
    elif argument < 1 << 8:
        out += bytes((major_bits | 24, argument))
    elif argument < 1 << 16:
        out.append(major_bits | 25)
        out += argument.to_bytes(2, "big")
    elif argument < 1 << 32:
        out.append(major_bits | 26)
        out += argument.to_bytes(4, "big")
    else:
        out.append(major_bits | 27)
        out += argument.to_bytes(8, "big")
