"""The ingress's prompt block hashes (router/prompt_blocks.py): for the same
request they equal the ones the simulator's engine computes (which equal real
vLLM's, see test_conformance.py) and the ones captured from real vLLM; a
cache_salt changes them; models without a tokenizer, batches and a saturated
pool fall back to no block hashes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter

from deploy.stack import with_simulated_model
from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.simulator.engine import EngineCore
from loadtests.simulator.protocol import RequestParser
from loadtests.simulator.sampling import Vocabulary
from router.prompt_blocks import PromptHasher, request_block_hashes
from router.prompt_tokens import load_tokenizer
from router.requests import parse_request
from scheduler.block_hash import low64
from scheduler.config import Config, ModelConfig, SimulatorConfig
from scheduler.errors import ConfigError
from tests.test_simulator_engine import CONVERSATION, VLLM_CHAT_BLOCK_HASHES

TOKENIZER = load_tokenizer(str(TINY_MODEL_DIR))
MODEL = "switchyard-tiny"
LONG_TEXT = (TINY_MODEL_DIR / "corpus.txt").read_text()[:3_000]
CHAT = {"model": MODEL, "messages": [
    {"role": "system", "content": "You answer questions about railway signalling."},
    {"role": "user", "content": [{"type": "text", "text": LONG_TEXT[:700]},
                                 {"type": "text", "text": "Which signal?"}]},
    {"role": "assistant", "content": "The red one.", "name": "guard"},
    {"role": "user", "content": "And after that?"}]}
COMPLETION = {"model": MODEL, "prompt": LONG_TEXT[:900]}


def _simulator_hashes(route: str, body: dict[str, object], settings: ModelConfig) -> list[int]:
    """What the simulator's engine hashes for the same request body."""
    sim = SimulatorConfig(model=MODEL, block_size_tokens=settings.block_size_tokens,
                          prefix_caching_hash_algo=settings.prefix_caching_hash_algo,
                          python_hash_seed=settings.python_hash_seed, max_model_len=4_096)
    parser = RequestParser(MODEL, TOKENIZER, sim.max_model_len)
    raw = json.dumps(body).encode()
    parsed = parser.chat(raw) if route == "chat" else parser.completion(raw)
    engine = EngineCore(sim, Vocabulary.of(TOKENIZER.vocab_size, TOKENIZER.eos_token_id,
                                           TOKENIZER.special_ids))
    request = engine.add_request(parsed.prompt_ids, parsed.limits, 0.0, parsed.cache_salt)
    return [low64(digest) for digest in request.digests]


def _ingress_hashes(route: str, body: dict[str, object], settings: ModelConfig
                    ) -> tuple[int, ...] | None:
    # The ingress sends the tenant's salt; here the body's stands for it.
    salt = str(body.get("cache_salt", ""))
    parsed = parse_request(route, json.dumps(body).encode(), salt)
    return request_block_hashes(TOKENIZER, settings, parsed.body, parsed.cache_salt)


SHA256_16 = ModelConfig(block_size_tokens=16)


@pytest.mark.parametrize(("route", "body", "settings"), [
    ("chat", CHAT, SHA256_16),
    ("chat", CHAT, ModelConfig(block_size_tokens=32, prefix_caching_hash_algo="sha256_cbor")),
    ("chat", {**CHAT, "add_generation_prompt": False}, SHA256_16),
    ("chat", {**CHAT, "cache_salt": "tenant-7"}, SHA256_16),
    ("chat", CHAT, ModelConfig(block_size_tokens=16, python_hash_seed="42")),
    ("completions", COMPLETION, SHA256_16),
    ("completions", {**COMPLETION, "prompt": [LONG_TEXT[:900]]}, SHA256_16),
    ("completions", {**COMPLETION, "prompt": list(range(5, 105))}, SHA256_16),
    ("completions", {**COMPLETION, "cache_salt": "tenant-7"},
     ModelConfig(block_size_tokens=32, prefix_caching_hash_algo="sha256_cbor")),
])
def test_ingress_block_hashes_equal_the_simulators(route: str, body: dict[str, object],
                                                   settings: ModelConfig) -> None:
    ours = _ingress_hashes(route, body, settings)
    assert ours is not None and len(ours) >= 3
    assert list(ours) == _simulator_hashes(route, body, settings)


def test_ingress_block_hashes_equal_real_vllms() -> None:
    body = {"model": MODEL, "messages": CONVERSATION}
    assert _ingress_hashes("chat", body, ModelConfig(block_size_tokens=32)) == tuple(
        VLLM_CHAT_BLOCK_HASHES)


def test_cache_salt_changes_every_block_hash() -> None:
    plain = _ingress_hashes("chat", CHAT, SHA256_16)
    salted = _ingress_hashes("chat", {**CHAT, "cache_salt": "a"}, SHA256_16)
    assert plain and salted and len(plain) == len(salted)
    # The salt is in the first block; every later block chains on it.
    assert not set(plain) & set(salted)
    assert _ingress_hashes("chat", {**CHAT, "cache_salt": "a"}, SHA256_16) == salted
    assert _ingress_hashes("chat", {**CHAT, "cache_salt": "b"}, SHA256_16) != salted
    # An empty salt is no salt, as in vLLM.
    assert _ingress_hashes("chat", {**CHAT, "cache_salt": ""}, SHA256_16) == plain


def test_a_longer_conversation_extends_the_shorter_ones_blocks() -> None:
    first = {"model": MODEL, "messages": CHAT["messages"][:2]}
    shorter = _ingress_hashes("chat", {**first, "add_generation_prompt": False}, SHA256_16)
    longer = _ingress_hashes("chat", CHAT, SHA256_16)
    assert shorter and longer and longer[: len(shorter)] == shorter


@pytest.mark.parametrize("prompt", [["one", "two"], [[1, 2, 3], [4, 5, 6]], ["one", [1, 2]]])
def test_a_batch_of_prompts_gets_no_block_hashes(prompt: list[object]) -> None:
    assert _ingress_hashes("completions", {"model": MODEL, "prompt": prompt}, SHA256_16) is None


def _hasher(models: dict[str, ModelConfig], *, threads: int = 1,
            inline_max_bytes: int = 1 << 20) -> tuple[PromptHasher, Counter]:
    outcomes = Counter("hashing", "outcomes", ["outcome"], registry=CollectorRegistry())
    return PromptHasher(models, threads, inline_max_bytes, outcomes), outcomes


def _count(outcomes: Counter, outcome: str) -> float:
    return outcomes.labels(outcome)._value.get()


async def test_models_without_a_tokenizer_fall_back() -> None:
    hasher, outcomes = _hasher({MODEL: ModelConfig(), "tokenized": ModelConfig(
        tokenizer_dir=str(TINY_MODEL_DIR))})
    await hasher.start()
    try:
        for model in (MODEL, "not-configured"):
            body = json.dumps({**COMPLETION, "model": model}).encode()
            assert await hasher.block_hashes(parse_request("completions", body)) is None
        assert _count(outcomes, "no_tokenizer") == 2
        tokenized = json.dumps({**COMPLETION, "model": "tokenized"}).encode()
        assert await hasher.block_hashes(parse_request("completions", tokenized))
        assert _count(outcomes, "inline") == 1
    finally:
        hasher.aclose()


async def test_large_prompts_are_hashed_on_the_pool_and_shed_when_it_is_full() -> None:
    settings = ModelConfig(tokenizer_dir=str(TINY_MODEL_DIR))
    hasher, outcomes = _hasher({MODEL: settings}, inline_max_bytes=100)
    await hasher.start()
    parsed = parse_request("completions", json.dumps(COMPLETION).encode())
    try:
        assert await hasher.block_hashes(parsed) == _ingress_hashes("completions", COMPLETION,
                                                                   settings)
        assert _count(outcomes, "pooled") == 1
        # Every slot taken: the next request goes without block hashes at once.
        results = await asyncio.gather(*(hasher.block_hashes(parsed) for _ in range(6)))
        assert results.count(None) == 2 and _count(outcomes, "shed") == 2
    finally:
        hasher.aclose()


@pytest.mark.parametrize(("settings", "message"), [
    (ModelConfig(prefix_caching_hash_algo="xxhash"), "models.m.prefix_caching_hash_algo"),
    (ModelConfig(block_size_tokens=0), "models.m.block_size_tokens"),
])
def test_unusable_model_settings_are_startup_errors(settings: ModelConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _hasher({"m": settings})


async def test_a_tokenizer_that_cannot_be_loaded_is_a_startup_error(tmp_path: Path) -> None:
    hasher, _ = _hasher({"m": ModelConfig(tokenizer_dir=str(tmp_path))})
    with pytest.raises(ConfigError, match=r"models\.m\.tokenizer_dir"):
        await hasher.start()


def test_simulator_defaults_agree_with_a_models_defaults() -> None:
    sim, model = SimulatorConfig(), ModelConfig()
    assert (sim.block_size_tokens, sim.prefix_caching_hash_algo, sim.python_hash_seed) == (
        model.block_size_tokens, model.prefix_caching_hash_algo, model.python_hash_seed)


def test_up_configures_the_simulated_model_unless_told_otherwise() -> None:
    sim = SimulatorConfig(block_size_tokens=32, prefix_caching_hash_algo="sha256_cbor")
    derived = with_simulated_model(Config(simulator=sim)).models[sim.model]
    assert derived == ModelConfig(tokenizer_dir=str(TINY_MODEL_DIR), block_size_tokens=32,
                                  prefix_caching_hash_algo="sha256_cbor")
    own = {sim.model: ModelConfig(block_size_tokens=64)}
    assert with_simulated_model(Config(simulator=sim, models=own)).models == own
    static = msgspec.convert({"replicas": [{"url": "http://127.0.0.1:1"}]}, Config)
    assert with_simulated_model(static).models == {}
