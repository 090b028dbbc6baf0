"""vLLM's KV-cache events on the wire (vllm/distributed/kv_events.py, 0.32).

A ZMQ message is three frames: topic, an 8-byte big-endian sequence number
(per publisher, from 0), and a msgpack payload. The payload is an EventBatch
encoded as an array `[ts, events, data_parallel_rank]` (array_like,
omit_defaults), each event a map tagged by "type" with None-valued optional
fields left out (omit_defaults). The structs below encode byte for byte as
vLLM's do and decode whatever a vLLM publisher sends (any msgpack int width,
int or bytes hashes, unknown trailing fields ignored).

Replay: a DEALER sends `[b"", start_seq (8 bytes)]` to the publisher's ROUTER
and receives `[b"", topic, seq, payload]` per buffered batch from start_seq
on, then `[b"", b"", END_SEQ, b""]`.
"""

from __future__ import annotations

import msgspec

# Block hash on the wire: the low 64 bits of the digest (default) or the whole digest.
ExternalBlockHash = int | bytes

MEDIUM_GPU = "GPU"
FULL_ATTENTION = "full_attention"
SEQ_BYTES = 8
END_SEQ = (-1).to_bytes(SEQ_BYTES, "big", signed=True)


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    # One entry per block (None for plain text).
    extra_keys: list[tuple[object, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVCacheEvent]
    data_parallel_rank: int | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _ENCODER.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Raises msgspec.DecodeError (a ValueError) on a malformed payload."""
    return _DECODER.decode(payload)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)
