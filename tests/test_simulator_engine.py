"""The simulator's pure core: the tiny model's tokenizer as vLLM applies it, the
block pool, and the engine's scheduling, caching, preemption and timing."""

from __future__ import annotations

import msgspec
import pytest

from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.simulator.detokenizer import IncrementalDetokenizer
from loadtests.simulator.engine import EngineCore, EngineRequest
from loadtests.simulator.kv_cache import BlockPool
from loadtests.simulator.sampling import SamplingLimits, Vocabulary
from router.prompt_tokens import load_tokenizer
from scheduler.block_hash import block_hashes, low64
from scheduler.config import SimulatorConfig
from scheduler.errors import ConfigError
from scheduler.kv_events import BlockRemoved, BlockStored

TOKENIZER = load_tokenizer(str(TINY_MODEL_DIR))
VOCAB = Vocabulary.of(TOKENIZER.vocab_size, TOKENIZER.eos_token_id, TOKENIZER.special_ids)
CFG = SimulatorConfig(block_size_tokens=4, cache_blocks=64, max_model_len=128,
                      max_num_batched_tokens=64, decode_ms_per_token=10.0, batch_ms_per_seq=1.0,
                      prefill_tokens_per_s=1_000.0, seed=7, kv_events_endpoint="tcp://x:1")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo, router! Which replica holds my prefix? 🚦"},
]
# transformers' apply_chat_template(add_generation_prompt=True) in vLLM 0.32's environment.
VLLM_CHAT_IDS = [3, 87, 93, 267, 882, 203, 38, 73, 289, 406, 73, 74, 18, 4, 203, 3, 89, 349, 203,
                 44, 132, 107, 80, 290, 16, 637, 339, 5, 966, 76, 77, 333, 430, 1019, 292, 93, 280,
                 609, 35, 225, 177, 258, 253, 104, 4, 203, 3, 914, 634, 318, 88, 203]
# vLLM's hash_block_tokens (sha256, block size 32) over VLLM_CHAT_IDS, as events carry it.
VLLM_CHAT_BLOCK_HASHES = [14841204819457247475]
VLLM_TEXT_IDS = [51, 82, 392, 477, 268, 262, 598, 16, 262, 637, 339, 601, 262, 430, 18]


def engine(**changes: object) -> EngineCore:
    return EngineCore(msgspec.structs.replace(CFG, **changes), VOCAB)


def drain(core: EngineCore, now_s: float = 0.0) -> float:
    """Runs steps until the engine is idle; returns the end time."""
    while (result := core.step(now_s)) is not None:
        now_s += result.duration_s
    return now_s


def limits(max_tokens: int = 4, **extra: object) -> SamplingLimits:
    return SamplingLimits(max_tokens=max_tokens, ignore_eos=True, **extra)  # type: ignore[arg-type]


# --- tokenizer ------------------------------------------------------------------


def test_prompt_ids_and_block_hashes_equal_real_vllms() -> None:
    assert TOKENIZER.encode_chat(CONVERSATION) == VLLM_CHAT_IDS
    assert TOKENIZER.encode("Once upon a time, a router met a replica.") == VLLM_TEXT_IDS
    hashes = block_hashes(VLLM_CHAT_IDS, 32, "sha256")
    assert [low64(digest) for digest in hashes] == VLLM_CHAT_BLOCK_HASHES
    assert TOKENIZER.eos_token_id == 4 and TOKENIZER.vocab_size == 1024


def test_chat_template_keeps_the_conversation_prefix() -> None:
    longer = [*CONVERSATION, {"role": "assistant", "content": "It routes."},
              {"role": "user", "content": "And a replica?"}]
    without_prompt = TOKENIZER.encode_chat(CONVERSATION, add_generation_prompt=False)
    assert TOKENIZER.encode_chat(longer)[: len(without_prompt)] == without_prompt
    assert VLLM_CHAT_IDS[: len(without_prompt)] == without_prompt


def test_detokenizer_holds_back_incomplete_characters() -> None:
    text = "Signal 🚦 and naïve café"
    ids = TOKENIZER.encode(text)
    detokenizer = IncrementalDetokenizer(TOKENIZER.tokenizer, [])
    deltas = [detokenizer.step(token) for token in ids]
    assert "".join(deltas) == text
    assert "" in deltas  # the emoji's bytes span several byte-level tokens
    assert IncrementalDetokenizer(TOKENIZER.tokenizer, []).step(TOKENIZER.eos_token_id) == ""


# --- block pool -----------------------------------------------------------------


def test_pool_evicts_least_recent_tails_first_and_announces_it() -> None:
    pool = BlockPool(6, 2, event_hash=low64)  # 5 usable blocks
    tokens_a, tokens_b = list(range(6)), list(range(50, 56))
    digests_a, digests_b = block_hashes(tokens_a, 2, "sha256"), block_hashes(tokens_b, 2, "sha256")
    blocks_a = pool.allocate(3)
    pool.cache_full_blocks(blocks_a, digests_a, tokens_a, 0, 3)
    pool.free(reversed(blocks_a))
    assert pool.usage() == 0.0 and pool.num_cached_blocks == 3
    stored = pool.take_events()
    assert stored == [BlockStored(
        block_hashes=[low64(d) for d in digests_a], parent_block_hash=None, token_ids=tokens_a,
        block_size=2, lora_id=None, medium="GPU", lora_name=None, extra_keys=[None] * 3,
        group_idx=0, kv_cache_spec_kind="full_attention")]
    # Two fresh blocks come from the never-used end; the third evicts A's tail.
    blocks_b = pool.allocate(3)
    assert pool.take_events() == [BlockRemoved(block_hashes=[low64(digests_a[2])], medium="GPU",
                                               group_idx=0)]
    pool.cache_full_blocks(blocks_b, digests_b, tokens_b, 1, 3)
    (event,) = pool.take_events()
    assert isinstance(event, BlockStored) and event.parent_block_hash == low64(digests_b[0])
    assert event.token_ids == tokens_b[2:]
    assert [b.digest for b in pool.longest_hit(digests_a, 3)] == digests_a[:2]
    assert pool.usage() == pytest.approx(3 / 5)


# --- engine ---------------------------------------------------------------------


@pytest.mark.parametrize(("prompt_tokens", "cached_tokens"), [(32, 28), (33, 32), (3, 0)])
def test_cached_tokens_never_cover_the_whole_prompt(prompt_tokens: int, cached_tokens: int) -> None:
    core = engine()
    prompt = list(range(10, 10 + prompt_tokens))
    core.add_request(prompt, limits(1), 0.0)
    drain(core)
    again = core.add_request(prompt, limits(1), 1.0)
    drain(core, 1.0)
    assert again.cached_tokens == cached_tokens
    assert again.computed_prompt_tokens == prompt_tokens - cached_tokens
    assert core.stats.prefix_cache_hits_tokens == cached_tokens
    assert core.stats.prefix_cache_queries_tokens == 2 * prompt_tokens


def test_step_time_grows_with_prefill_and_batch() -> None:
    core = engine()
    first = core.add_request(list(range(100)), limits(3), 0.0)
    # Prefill of 64 (the token budget), then 36 more and the first token.
    assert core.step(0.0).duration_s == pytest.approx(0.010 + 64 / 1000)
    result = core.step(1.0)
    assert result.duration_s == pytest.approx(0.010 + 36 / 1000)
    assert [output.request for output in result.outputs] == [first]
    core.add_request(list(range(200, 208)), limits(3), 2.0)
    core.add_request(list(range(300, 308)), limits(3), 2.0)
    # One decode plus two 8-token prefills, then three decodes in one step.
    assert core.step(2.0).duration_s == pytest.approx(0.010 + 16 / 1000)
    assert core.step(3.0).duration_s == pytest.approx(0.010 + 2 * 0.001)


def test_requests_beyond_max_num_seqs_wait() -> None:
    core = engine(max_num_seqs=2)
    requests = [core.add_request([i] * 8, limits(5), 0.0) for i in range(3)]
    core.step(0.0)
    assert (core.num_running, core.num_waiting) == (2, 1)
    drain(core)
    assert requests[2].first_scheduled_at_s is not None and requests[2].first_scheduled_at_s > 0
    assert all(request.finish_reason == "length" for request in requests)


def test_preemption_recomputes_and_keeps_the_output() -> None:
    prompts = [list(range(i * 100, i * 100 + 24)) for i in range(3)]
    roomy = engine()
    alone = [roomy.add_request(prompt, limits(24), 0.0) for prompt in prompts]
    drain(roomy)
    tight = engine(cache_blocks=26, max_model_len=100)  # 25 blocks: 3 x 12 do not fit
    squeezed = [tight.add_request(prompt, limits(24), 0.0) for prompt in prompts]
    drain(tight)
    assert tight.stats.num_preemptions > 0
    preempted = [request for request in squeezed if request.num_preemptions]
    assert preempted and all(r.computed_prompt_tokens > len(r.prompt_ids) for r in preempted)
    assert [r.token_ids for r in squeezed] == [r.token_ids for r in alone]
    assert tight.pool.usage() == 0.0
    # Re-admitted preempted requests are left out of the prefix-cache counters.
    assert tight.stats.prefix_cache_queries_tokens == 3 * 24


def test_kv_events_name_every_full_block_once() -> None:
    core = engine()
    prompt = list(range(500, 510))
    request = core.add_request(prompt, limits(7), 0.0)
    stored: list[BlockStored] = []
    now_s = 0.0
    while (result := core.step(now_s)) is not None:
        now_s += result.duration_s
        stored += [event for event in result.events if isinstance(event, BlockStored)]
    # 10 prompt + 7 output tokens, of which the last is never computed: 4 full blocks.
    assert len(request.token_ids) == 17
    digests = block_hashes(request.token_ids[:16], 4, "sha256")
    assert [h for event in stored for h in event.block_hashes] == [low64(d) for d in digests]
    position = 0
    for event in stored:
        assert event.parent_block_hash == (low64(digests[position - 1]) if position else None)
        assert event.token_ids == request.token_ids[position * 4 : (position + len(
            event.block_hashes)) * 4]
        position += len(event.block_hashes)
    again = core.add_request(prompt, limits(1), now_s)
    result = core.step(now_s)
    assert again.cached_tokens == 8 and not result.events  # hits are not re-announced


def test_generation_is_deterministic_and_honours_limits() -> None:
    prompts = [TOKENIZER.encode(f"prompt {i}: the router and the replica") for i in range(40)]
    natural = SamplingLimits(max_tokens=400, min_tokens=5)
    first, second = (engine(max_model_len=512, cache_blocks=2048) for _ in range(2))
    runs = [first.add_request(prompt, natural, 0.0) for prompt in prompts]
    again = [second.add_request(prompt, natural, 0.0) for prompt in prompts]
    drain(first)
    drain(second)
    assert [r.token_ids for r in runs] == [r.token_ids for r in again]
    # EOS (probability 0.02 a token) comes well before 400 tokens, never before min_tokens.
    assert {r.finish_reason for r in runs} == {"stop"}
    assert all(r.num_output_tokens > natural.min_tokens for r in runs)
    assert all(r.token_ids[-1] == TOKENIZER.eos_token_id for r in runs)
    fixed = first.add_request(prompts[0], limits(60), 10.0)
    drain(first, 10.0)
    assert (fixed.num_output_tokens, fixed.finish_reason) == (60, "length")
    # ignore_eos changes where the output ends, not what it says.
    assert fixed.token_ids[: runs[0].num_tokens] == runs[0].token_ids


def test_abort_returns_the_blocks() -> None:
    core = engine()
    request: EngineRequest = core.add_request(list(range(40)), limits(50), 0.0)
    core.step(0.0)
    assert core.pool.usage() > 0
    core.abort(request)
    assert (request.finish_reason, core.pool.usage(), core.has_work()) == ("abort", 0.0, False)


@pytest.mark.parametrize("changes", [
    {"cache_blocks": 8},  # 7 blocks of 4 hold fewer than max_model_len tokens
    {"prefix_caching_hash_algo": "xxhash"},
    {"max_num_seqs": 0},
    {"time_scale": 0.0},
])
def test_engine_config_errors(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        engine(**changes)
