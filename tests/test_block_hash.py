"""vLLM's block hashes and KV-event wire format, against vectors computed with
vLLM 0.32's own functions (vllm.v1.core.kv_cache_utils.hash_block_tokens,
vllm.utils.hashing.sha256 / sha256_cbor, vllm.distributed.kv_events structs)."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import cbor2
import msgspec
import pytest

from scheduler.block_hash import (
    DEFAULT_NONE_HASH_SEED,
    HASH_ALGOS,
    PICKLE_PROTOCOL,
    block_hashes,
    canonical_cbor,
    hash_block,
    low64,
    none_hash,
)
from scheduler.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_seq,
)

# KV-event messages captured from real vLLM 0.32 (block size 32, sha256, PYTHONHASHSEED unset).
CAPTURED_EVENTS = Path(__file__).resolve().parent / "data" / "vllm_samples" / "kv_events.json"
# {algo: (NONE_HASH, digests of blocks [1..4] and [5..8])}, PYTHONHASHSEED unset.
VLLM_VECTORS = {
    "sha256": (
        "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198",
        ["52a7f141c60918f65779927090482b5a24adbe68c8613a211a1eb4e3edd9361a",
         "bee96bce54f5fcaba04c4a3fc2491b30b48e29dbbd38a327d41bc1f76b956dde"],
    ),
    "sha256_cbor": (
        "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0",
        ["58d0879dff3800f65f8c5fd449d73048c0f7699dd238a03b84b146b151d55111",
         "e1bc29393a2da9fd798f35ff04d215f846aee6df4b803ce3d43b57df56b58fb1"],
    ),
}
# vLLM's maybe_convert_block_hash of the second digest above.
VLLM_LOW64 = {"sha256": 15284023028817948126, "sha256_cbor": 15292913576410714033}
# hash_block_tokens(fn, None, WIDE_TOKENS, WIDE_EXTRA_KEYS).
WIDE_TOKENS = [3, 89, 70000, 5, 1023, 2**31, 0, 255]
WIDE_EXTRA_KEYS = ("salt", b"\x01", -7)
VLLM_WIDE = {
    "sha256": "9d68148e9ef7515684b389e0ce1864ff42bac63ba226da0d8f972728a097caea",
    "sha256_cbor": "2d9848c8a1b05e44dbffe2f2b32c843c23682ca50d0ccc4f95a46d6ae3b51fb3",
}
# NONE_HASH for sha256 with PYTHONHASHSEED=0.
VLLM_NONE_HASH_SEED_0 = "1973e23848344dc43a988a9b478663803cfffe1243480253f9a3cf004b14aa7c"
# msgspec.msgpack.encode of vLLM's own KVEventBatch built like GOLDEN_BATCH below.
VLLM_BATCH_HEX = (
    "93cb3ff8000000000000938ba474797065ab426c6f636b53746f726564ac626c6f636b5f686173686573"
    "9201cfffffffffffffffffb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401"
    "020304aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e"
    "616d65c0aa65787472615f6b65797392c0c0a967726f75705f69647800b26b765f63616368655f737065"
    "635f6b696e64ae66756c6c5f617474656e74696f6e84a474797065ac426c6f636b52656d6f766564ac62"
    "6c6f636b5f6861736865739107a66d656469756da3475055a967726f75705f6964780081a474797065b0"
    "416c6c426c6f636b73436c656172656400"
)
GOLDEN_BATCH = KVEventBatch(
    ts=1.5,
    events=[
        BlockStored(block_hashes=[1, 2**64 - 1], parent_block_hash=None, token_ids=[1, 2, 3, 4],
                    block_size=2, lora_id=None, medium="GPU", lora_name=None,
                    extra_keys=[None, None], group_idx=0, kv_cache_spec_kind="full_attention"),
        BlockRemoved(block_hashes=[7], medium="GPU", group_idx=0),
        AllBlocksCleared(),
    ],
    data_parallel_rank=0,
)


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_block_hashes_equal_vllms(algo: str) -> None:
    expected_root, expected_chain = VLLM_VECTORS[algo]
    assert none_hash(algo).hex() == expected_root
    hashes = block_hashes(list(range(1, 9)), 4, algo)
    assert [digest.hex() for digest in hashes] == expected_chain
    assert low64(hashes[-1]) == VLLM_LOW64[algo]
    assert hash_block(algo, None, WIDE_TOKENS, WIDE_EXTRA_KEYS).hex() == VLLM_WIDE[algo]


def test_python_hash_seed_replaces_the_default_seed() -> None:
    assert none_hash("sha256", "0").hex() == VLLM_NONE_HASH_SEED_0
    assert none_hash("sha256", DEFAULT_NONE_HASH_SEED) == none_hash("sha256")


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_chains_cover_full_blocks_and_continue(algo: str) -> None:
    tokens = list(range(100, 142))
    hashes = block_hashes(tokens, 16, algo)
    assert len(hashes) == 2  # the 10-token tail is not a full block
    assert block_hashes(tokens[:32], 16, algo) == hashes
    assert block_hashes(tokens[16:32], 16, algo, parent=hashes[0]) == hashes[1:]
    changed = block_hashes([0, *tokens[1:]], 16, algo)
    assert changed[0] != hashes[0] and changed[1] != hashes[1]
    salted = block_hashes(tokens, 16, algo, ("cache_salt", "tenant-a"))
    assert not set(salted) & set(hashes)


def test_low64_is_the_low_64_bits_big_endian() -> None:
    digest = bytes(range(32))
    assert low64(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert 0 <= low64(b"\xff" * 32) == 2**64 - 1


def test_pickle_protocol_is_the_interpreters_highest() -> None:
    # vLLM pickles with HIGHEST_PROTOCOL; a Python that raised it would change vLLM's hashes.
    assert pickle.HIGHEST_PROTOCOL == PICKLE_PROTOCOL


@pytest.mark.parametrize("value", [
    None, True, False, 0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
    -1, -24, -25, -256, -257, -(2**64), b"", b"\x00" * 300, "", "naïve 🚦", "x" * 70000,
    (), [], (1, (2, [3, b"4"]), None), (b"\x01" * 32, tuple(range(0, 70000, 7000)), None),
])
def test_canonical_cbor_matches_cbor2(value: object) -> None:
    assert canonical_cbor(value) == cbor2.dumps(value, canonical=True)


@pytest.mark.parametrize("value", [1.5, {"a": 1}, 2**64, object()])
def test_canonical_cbor_refuses_what_no_hash_input_holds(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        canonical_cbor(value)


def test_unknown_algorithm_is_an_error() -> None:
    with pytest.raises(ValueError, match="xxhash"):
        block_hashes([1, 2], 1, "xxhash")


def test_kv_event_batch_encodes_byte_for_byte_as_vllms() -> None:
    assert encode_batch(GOLDEN_BATCH).hex() == VLLM_BATCH_HEX
    assert decode_batch(bytes.fromhex(VLLM_BATCH_HEX)) == GOLDEN_BATCH
    # An array of [ts, events, rank]; events are maps tagged by "type", None fields omitted.
    ts, events, rank = msgspec.msgpack.decode(encode_batch(GOLDEN_BATCH))
    assert (ts, rank) == (1.5, 0)
    assert [event["type"] for event in events] == ["BlockStored", "BlockRemoved",
                                                   "AllBlocksCleared"]
    assert "kv_cache_spec_sliding_window" not in events[0] and "lora_id" in events[0]


def test_decoder_accepts_digests_and_unknown_fields() -> None:
    payload = msgspec.msgpack.encode([2.0, [
        {"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": None,
         "token_ids": [5], "block_size": 1, "lora_id": None, "medium": "GPU",
         "lora_name": None, "from_a_later_vllm": 1},
    ]])
    batch = decode_batch(payload)
    assert batch.data_parallel_rank is None
    assert batch.events[0] == BlockStored(block_hashes=[b"\x01" * 32], parent_block_hash=None,
                                          token_ids=[5], block_size=1, lora_id=None,
                                          medium="GPU", lora_name=None)


def test_sequence_frames() -> None:
    assert encode_seq(0) == b"\x00" * 8 and decode_seq(encode_seq(2**40)) == 2**40
    assert decode_seq(END_SEQ) == -1


def test_captured_vllm_events_decode_reencode_and_rehash() -> None:
    """Real payloads decode and re-encode to the same bytes, and every stored
    block's hash is our digest of its tokens chained to its parent."""
    digests: dict[int, bytes] = {}
    stored = 0
    for message in json.loads(CAPTURED_EVENTS.read_text()):
        payload = base64.b64decode(message["payload_base64"])
        batch = decode_batch(payload)
        assert encode_batch(batch) == payload
        for event in batch.events:
            if not isinstance(event, BlockStored):
                continue
            parent = None
            if event.parent_block_hash is not None:
                parent = digests[event.parent_block_hash]  # type: ignore[index]
            chain = block_hashes(event.token_ids, event.block_size, "sha256", parent=parent)
            assert [low64(digest) for digest in chain] == event.block_hashes
            digests.update(zip(event.block_hashes, chain, strict=True))  # type: ignore[arg-type]
            stored += 1
    assert stored >= 3
