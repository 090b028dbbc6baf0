"""The simulated engine: admission against the prefix cache, when each output
token is due, and what it says.

Pure: no asyncio and no clock of its own; callers pass times in (any
monotonic seconds). Output is a function of the config seed and the prompt
token ids only, so the same request gets the same answer on every replica.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.simulator.prefix_cache import PrefixCache, block_hashes, cacheable_prompt_blocks
from loadtests.simulator.tokens import token_id
from scheduler.config import SimulatorConfig
from scheduler.errors import ConfigError

# Context window reported by /v1/models and enforced on prompt + max_tokens.
MAX_MODEL_LEN_TOKENS = 8_192
# Chance that a token is EOS once min_tokens are out; mean natural length 50.
EOS_PROBABILITY = 0.02
EOS_TOKEN_ID = token_id("<|endoftext|>")

_WORDS = (
    "the", "a", "router", "replica", "cache", "prefix", "token", "block", "queue",
    "request", "stream", "model", "latency", "batch", "decode", "prefill", "fleet",
    "tenant", "quota", "signal", "of", "to", "and", "in", "is", "fast", "warm",
    "cold", "local", "steady", "small", "large", ",", ".",
)


@dataclass(frozen=True, kw_only=True)
class SamplingLimits:
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenSchedule:
    """When output tokens are due: prefill of the uncached prompt, then a fixed decode step."""

    admitted_at_s: float
    prefill_s: float
    decode_interval_s: float

    def due_at_s(self, index: int) -> float:
        return self.admitted_at_s + self.prefill_s + index * self.decode_interval_s


@dataclass(frozen=True)
class SimToken:
    index: int
    token_id: int
    # Empty for EOS: the detokenizer skips special tokens, as vLLM's does.
    text: str
    finish_reason: str | None


def request_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(
        struct.pack(f"<q{len(prompt_ids)}I", seed, *prompt_ids), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


class Generation:
    """One request's output stream after admission."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        cached_tokens: int,
        limits: SamplingLimits,
        schedule: TokenSchedule,
        seed: int,
    ) -> None:
        self.prompt_ids = tuple(prompt_ids)
        self.cached_tokens = cached_tokens
        self.limits = limits
        self.schedule = schedule
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self._rng = random.Random(request_seed(seed, prompt_ids))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_due_at_s(self) -> float:
        return self.schedule.due_at_s(len(self.output_ids))

    def step(self) -> SimToken:
        """Produces the next token; the caller waits until next_due_at_s() first."""
        if self.done:
            raise RuntimeError("generation already finished")
        index = len(self.output_ids)
        # Both draws happen every step so the text does not depend on ignore_eos.
        eos_draw = self._rng.random()
        word = _WORDS[self._rng.randrange(len(_WORDS))]
        eos_allowed = not self.limits.ignore_eos and index >= self.limits.min_tokens
        is_eos = eos_allowed and eos_draw < EOS_PROBABILITY
        text = "" if is_eos else (word if index == 0 else " " + word)
        new_id = EOS_TOKEN_ID if is_eos else token_id(text)
        self.output_ids.append(new_id)
        # vLLM checks the length cap before EOS.
        if len(self.output_ids) >= self.limits.max_tokens:
            self.finish_reason = "length"
        elif is_eos:
            self.finish_reason = "stop"
        return SimToken(index, new_id, text, self.finish_reason)

    def abort(self) -> str:
        """Ends the generation if it is still running; returns how it finished."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
        return self.finish_reason


class SimEngine:
    """Prefix cache plus timing model for one replica."""

    def __init__(self, cfg: SimulatorConfig) -> None:
        _check_config(cfg)
        self.cfg = cfg
        self.block_size_tokens = cfg.block_size_tokens
        self.prefix_cache = PrefixCache(cfg.cache_blocks)

    def admit(self, prompt_ids: Sequence[int], limits: SamplingLimits, now_s: float) -> Generation:
        """Looks the prompt up in the cache and schedules its tokens from `now_s`."""
        block_size = self.block_size_tokens
        usable_blocks = cacheable_prompt_blocks(len(prompt_ids), block_size)
        hashes = block_hashes(prompt_ids[: usable_blocks * block_size], block_size)
        cached_tokens = self.prefix_cache.match(hashes) * block_size
        schedule = TokenSchedule(
            admitted_at_s=now_s,
            prefill_s=(len(prompt_ids) - cached_tokens) / self.cfg.prefill_tokens_per_s,
            decode_interval_s=self.cfg.decode_ms_per_token / 1000.0,
        )
        return Generation(prompt_ids, cached_tokens, limits, schedule, self.cfg.seed)

    def prefill_done(self, generation: Generation) -> None:
        """The prompt's full blocks are computed now, so later requests can hit them."""
        self.prefix_cache.store(block_hashes(generation.prompt_ids, self.block_size_tokens))

    def release(self, generation: Generation) -> None:
        """Caches the blocks the request computed, output included, as vLLM does on free."""
        if not generation.output_ids:
            return
        # The last sampled token was never fed back, so it has no KV yet.
        computed = generation.prompt_ids + tuple(generation.output_ids[:-1])
        self.prefix_cache.store(block_hashes(computed, self.block_size_tokens))

    def kv_blocks(self, generation: Generation) -> int:
        """Blocks a running request holds (shared prefix blocks counted per request)."""
        tokens = generation.prompt_tokens + generation.completion_tokens
        return math.ceil(tokens / self.block_size_tokens)


def _check_config(cfg: SimulatorConfig) -> None:
    if cfg.prefill_tokens_per_s <= 0:
        raise ConfigError("simulator.prefill_tokens_per_s must be positive")
    if cfg.decode_ms_per_token < 0:
        raise ConfigError("simulator.decode_ms_per_token must not be negative")
    if cfg.block_size_tokens < 1 or cfg.cache_blocks < 1:
        raise ConfigError("simulator.block_size_tokens and cache_blocks must be at least 1")
