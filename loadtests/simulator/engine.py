"""The simulated engine core: vLLM v1's scheduler over a block pool, one step at a time.

Each step schedules running requests first (one decode token each, or the
next chunk of a prefill), preempting the newest running request when blocks
run out (it is recomputed later), then admits waiting requests against the
prefix cache while the token budget (max_num_batched_tokens) and
max_num_seqs allow. Blocks become cache hits as soon as they are scheduled,
as in vLLM. A step lasts a time computed from its prefill tokens and
decoding sequences; its sampled tokens are due at the step's end.

Pure: no asyncio and no clock; callers pass `now_s` (any monotonic seconds).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtests.simulator.kv_cache import Block, BlockPool
from loadtests.simulator.sampling import SamplingLimits, TokenSampler, Vocabulary
from scheduler.block_hash import (
    DEFAULT_NONE_HASH_SEED,
    HASH_ALGOS,
    cache_salt_keys,
    hash_block,
    low64,
)
from scheduler.config import SimulatorConfig
from scheduler.errors import ConfigError
from scheduler.kv_events import KVCacheEvent


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class EngineRequest:
    prompt_ids: tuple[int, ...]
    limits: SamplingLimits
    sampler: TokenSampler
    arrived_at_s: float
    token_ids: list[int]
    # Digests of the full blocks of token_ids, extended as tokens arrive.
    digests: list[bytes] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Leading blocks already registered in the prefix cache.
    num_cached_blocks: int = 0
    # The prefix-cache hit at first scheduling (usage's cached_tokens); -1 before.
    cached_tokens: int = -1
    # Prompt tokens in blocks this request added to the prefix cache, as of its
    # first token (usage's created_cache_tokens).
    created_cache_tokens: int = 0
    # Prompt tokens the engine ran, recomputation after preemption included.
    computed_prompt_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_at_s: float | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    # Goes into the first block's hash (vLLM's per-tenant cache isolation).
    cache_salt: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)


@dataclass(frozen=True)
class TokenOutput:
    request: EngineRequest
    token_id: int
    finish_reason: str | None


@dataclass(frozen=True)
class StepResult:
    duration_s: float
    outputs: list[TokenOutput]
    # KV events of the step, for one published batch.
    events: list[KVCacheEvent]


@dataclass
class EngineStats:
    num_preemptions: int = 0
    # vLLM leaves re-admitted preempted requests out of these two.
    prefix_cache_queries_tokens: int = 0
    prefix_cache_hits_tokens: int = 0


class EngineCore:
    """Requests, blocks and the scheduler of one replica."""

    def __init__(self, cfg: SimulatorConfig, vocab: Vocabulary) -> None:
        check_engine_config(cfg)
        self.cfg = cfg
        self.vocab = vocab
        self.block_size = cfg.block_size_tokens
        self.stats = EngineStats()
        self.pool = BlockPool(
            cfg.cache_blocks, cfg.block_size_tokens,
            enable_caching=cfg.enable_prefix_caching,
            event_hash=(low64 if cfg.kv_events_int_hashes else bytes) if cfg.kv_events_endpoint
            else None,
        )
        self._algo = cfg.prefix_caching_hash_algo
        self._hash_seed = cfg.python_hash_seed or DEFAULT_NONE_HASH_SEED
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def add_request(
        self, prompt_ids: Sequence[int], limits: SamplingLimits, now_s: float,
        cache_salt: str | None = None,
    ) -> EngineRequest:
        request = EngineRequest(
            prompt_ids=tuple(prompt_ids),
            limits=limits,
            sampler=TokenSampler(self.cfg.seed, prompt_ids, self.vocab),
            arrived_at_s=now_s,
            token_ids=list(prompt_ids),
            cache_salt=cache_salt,
        )
        self._extend_digests(request)
        self._waiting.append(request)
        return request

    def abort(self, request: EngineRequest) -> None:
        """Drops a request that has not finished; its blocks return to the pool."""
        if request.status is Status.FINISHED:
            return
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        self._release(request, "abort")

    def step(self, now_s: float) -> StepResult | None:
        """Schedules and runs one step from `now_s`; None when there is nothing to run."""
        plan = self._schedule(now_s)
        if not plan:
            return None
        duration_s = self._duration_s(plan)
        outputs = [output for request, num_new in plan.items()
                   if (output := self._run(request, num_new)) is not None]
        return StepResult(duration_s, outputs, self.pool.take_events())

    def _schedule(self, now_s: float) -> dict[EngineRequest, int]:
        budget = self.cfg.max_num_batched_tokens
        plan: dict[EngineRequest, int] = {}
        preempted = False
        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            scheduled, preempted_any = self._allocate_running(request, num_new)
            preempted = preempted or preempted_any
            if not scheduled:
                break
            plan[request] = num_new
            budget -= num_new
            index += 1
        # vLLM admits nothing in a step that had to preempt.
        if not preempted:
            self._admit_waiting(plan, budget, now_s)
        return plan

    def _allocate_running(self, request: EngineRequest, num_new: int) -> tuple[bool, bool]:
        """Finds blocks for `num_new` more tokens, preempting from the back of the
        running list; returns (scheduled, preempted anything)."""
        preempted = False
        while True:
            needed = self._blocks_for(request.num_computed_tokens + num_new) - len(request.blocks)
            if needed <= self.pool.num_free_blocks:
                request.blocks.extend(self.pool.allocate(max(needed, 0)))
                self._cache_blocks(request, request.num_computed_tokens + num_new)
                return True, preempted
            victim = self._running.pop()
            self._preempt(victim)
            preempted = True
            if victim is request:
                return False, preempted

    def _admit_waiting(self, plan: dict[EngineRequest, int], budget: int, now_s: float) -> None:
        block_size = self.block_size
        while self._waiting and budget > 0 and len(self._running) < self.cfg.max_num_seqs:
            request = self._waiting[0]
            # The last token is always computed: its logits give the next token.
            hit = self.pool.longest_hit(request.digests, (request.num_tokens - 1) // block_size)
            hit_tokens = len(hit) * block_size
            num_new = min(request.num_tokens - hit_tokens, budget)
            new_blocks = self._blocks_for(hit_tokens + num_new) - len(hit)
            if self.pool.blocks_to_take(hit, new_blocks) > self.pool.num_free_blocks:
                break
            self._waiting.popleft()
            self.pool.touch(hit)
            request.blocks = [*hit, *self.pool.allocate(new_blocks)]
            request.num_cached_blocks = len(hit)
            request.num_computed_tokens = hit_tokens
            self._cache_blocks(request, hit_tokens + num_new)
            self._count_admission(request, hit_tokens, now_s)
            request.status = Status.RUNNING
            self._running.append(request)
            plan[request] = num_new
            budget -= num_new

    def _count_admission(self, request: EngineRequest, hit_tokens: int, now_s: float) -> None:
        if request.num_preemptions == 0:
            self.stats.prefix_cache_queries_tokens += request.num_tokens
            self.stats.prefix_cache_hits_tokens += hit_tokens
        if request.cached_tokens < 0:
            request.cached_tokens = hit_tokens
            request.first_scheduled_at_s = now_s

    def _run(self, request: EngineRequest, num_new: int) -> TokenOutput | None:
        """Computes `num_new` tokens of the request; samples the next token once caught up."""
        prompt_len = len(request.prompt_ids)
        start = request.num_computed_tokens
        request.computed_prompt_tokens += max(min(start + num_new, prompt_len) - start, 0)
        request.num_computed_tokens = start + num_new
        if request.num_computed_tokens < request.num_tokens:
            return None  # a prefill chunk that does not reach the end
        if request.num_output_tokens == 0 and request.num_preemptions == 0:
            cached_end = min(request.num_cached_blocks * self.block_size, len(request.prompt_ids))
            request.created_cache_tokens = max(cached_end - request.cached_tokens, 0)
        token_id = request.sampler.next_token(request.num_output_tokens, request.limits)
        request.token_ids.append(token_id)
        self._extend_digests(request)
        reason = request.sampler.finish_reason(
            request.num_output_tokens, request.num_tokens, token_id, request.limits,
            self.cfg.max_model_len)
        if reason is not None:
            self._running.remove(request)
            self._release(request, reason)
        return TokenOutput(request, token_id, reason)

    def _duration_s(self, plan: dict[EngineRequest, int]) -> float:
        decoding = sum(1 for request, num_new in plan.items() if _is_decode(request, num_new))
        prefill_tokens = sum(num_new for request, num_new in plan.items()
                             if not _is_decode(request, num_new))
        cfg = self.cfg
        step_ms = cfg.decode_ms_per_token + cfg.batch_ms_per_seq * max(decoding - 1, 0)
        return step_ms / 1000.0 + prefill_tokens / cfg.prefill_tokens_per_s

    def _preempt(self, request: EngineRequest) -> None:
        """Frees a running request's blocks; it waits at the front to be recomputed."""
        self.pool.free(reversed(request.blocks))
        request.blocks = []
        request.num_computed_tokens = 0
        request.num_cached_blocks = 0
        request.num_preemptions += 1
        request.status = Status.PREEMPTED
        self.stats.num_preemptions += 1
        self._waiting.appendleft(request)

    def _release(self, request: EngineRequest, reason: str) -> None:
        # Tail blocks first, so eviction trims chains from the end and heads stay hits.
        self.pool.free(reversed(request.blocks))
        request.blocks = []
        request.status = Status.FINISHED
        request.finish_reason = reason

    def _cache_blocks(self, request: EngineRequest, num_tokens: int) -> None:
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        self.pool.cache_full_blocks(request.blocks, request.digests, request.token_ids,
                                    request.num_cached_blocks, num_full)
        request.num_cached_blocks = max(request.num_cached_blocks, num_full)

    def _extend_digests(self, request: EngineRequest) -> None:
        size = self.block_size
        digests = request.digests
        while (len(digests) + 1) * size <= request.num_tokens:
            start = len(digests) * size
            parent = digests[-1] if digests else None
            extra_keys = None if digests else cache_salt_keys(request.cache_salt)
            digests.append(hash_block(self._algo, parent, request.token_ids[start : start + size],
                                      extra_keys, seed=self._hash_seed))

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def _is_decode(request: EngineRequest, num_new: int) -> bool:
    return num_new == 1 and request.num_output_tokens > 0 and (
        request.num_computed_tokens == request.num_tokens - 1)


def check_engine_config(cfg: SimulatorConfig) -> None:
    """Raises ConfigError for settings the engine cannot run with."""
    if cfg.prefill_tokens_per_s <= 0 or cfg.time_scale <= 0:
        raise ConfigError("simulator.prefill_tokens_per_s and time_scale must be positive")
    if cfg.decode_ms_per_token < 0 or cfg.batch_ms_per_seq < 0:
        raise ConfigError("simulator.decode_ms_per_token and batch_ms_per_seq must not be negative")
    if cfg.block_size_tokens < 1 or cfg.max_num_seqs < 1 or cfg.max_num_batched_tokens < 1:
        raise ConfigError("simulator.block_size_tokens, max_num_seqs and max_num_batched_tokens "
                          "must be at least 1")
    if cfg.prefix_caching_hash_algo not in HASH_ALGOS:
        raise ConfigError(f"simulator.prefix_caching_hash_algo must be one of {HASH_ALGOS}")
    # vLLM refuses to start unless one request of max_model_len fits in the cache.
    if (cfg.cache_blocks - 1) * cfg.block_size_tokens < cfg.max_model_len:
        raise ConfigError(
            f"simulator.cache_blocks={cfg.cache_blocks} holds fewer than max_model_len="
            f"{cfg.max_model_len} tokens in blocks of {cfg.block_size_tokens}")
