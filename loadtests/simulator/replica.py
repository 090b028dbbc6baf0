"""One simulated vLLM replica: the async shell around the pure engine.

Requests queue for one of `max_running_requests` slots (vLLM's max_num_seqs),
then each sleeps until its tokens are due. Nothing runs in the background:
every request is driven by its own HTTP handler, so a cancelled handler is an
aborted request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry

from loadtests.simulator.engine import Generation, SamplingLimits, SimEngine, SimToken
from loadtests.simulator.ledger import RequestLedger, RequestRecord
from loadtests.simulator.metrics import (
    CacheInfo,
    EngineGauges,
    ReplicaCollector,
    ReplicaStats,
)
from scheduler.config import SimulatorConfig

# vLLM's max_num_seqs on CPU: more requests than this wait.
MAX_RUNNING_REQUESTS = 128


class Run:
    """An admitted request, stepped token by token by its handler."""

    def __init__(
        self,
        replica: SimReplica,
        generation: Generation,
        record: RequestRecord,
        arrived_at_s: float,
    ) -> None:
        self._replica = replica
        self.generation = generation
        self.record = record
        self.arrived_at_s = arrived_at_s
        self.last_token_at_s: float | None = None
        self.closed = False

    @property
    def prompt_tokens(self) -> int:
        return self.generation.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return self.generation.cached_tokens

    @property
    def completion_tokens(self) -> int:
        return self.generation.completion_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.generation.finish_reason

    async def next_token(self) -> SimToken | None:
        """Waits until the next token is due and returns it; None once finished."""
        if self.generation.done:
            return None
        loop = asyncio.get_running_loop()
        delay_s = self.generation.next_due_at_s() - loop.time()
        # sleep(0) still yields, so one fast stream cannot starve the others.
        await asyncio.sleep(max(delay_s, 0.0))
        token = self.generation.step()
        self._replica.on_token(self, token, loop.time())
        return token


class SimReplica:
    """Engine state, counters and ground truth of one replica."""

    def __init__(
        self,
        cfg: SimulatorConfig,
        *,
        max_running_requests: int = MAX_RUNNING_REQUESTS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self.engine = SimEngine(cfg)
        self.ledger = RequestLedger()
        self.stats = ReplicaStats()
        # A registry per replica: several replicas share one process.
        self.registry = CollectorRegistry(auto_describe=False)
        cache_info = CacheInfo(cfg.block_size_tokens, cfg.cache_blocks)
        self.registry.register(ReplicaCollector(cfg.model, self.stats, self.gauges, cache_info))
        self.num_waiting = 0
        self._running: set[Run] = set()
        self._slots = asyncio.Semaphore(max_running_requests)
        self._wall_clock = wall_clock

    @property
    def num_running(self) -> int:
        return len(self._running)

    def server_load(self) -> int:
        """Requests in flight, as vLLM's /load counts them."""
        return self.num_waiting + self.num_running

    def gauges(self) -> EngineGauges:
        used_blocks = sum(self.engine.kv_blocks(run.generation) for run in self._running)
        return EngineGauges(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage_perc=min(used_blocks / self.cfg.cache_blocks, 1.0),
        )

    @asynccontextmanager
    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], limits: SamplingLimits
    ) -> AsyncIterator[Run]:
        """Queues, admits and yields the request's Run; leaving early aborts it."""
        loop = asyncio.get_running_loop()
        arrived_at_s = loop.time()
        record = RequestRecord(
            request_id=request_id,
            prompt_tokens=len(prompt_ids),
            started_at_s=self._wall_clock(),
        )
        self.ledger.add(record)
        await self._admission(record, arrived_at_s)
        generation = self.engine.admit(prompt_ids, limits, loop.time())
        run = Run(self, generation, record, arrived_at_s)
        self._on_admitted(run, loop.time())
        try:
            yield run
        finally:
            # Cancelled, failed writing, or left early: all are aborts in vLLM.
            self._close(run, loop.time())

    async def _admission(self, record: RequestRecord, arrived_at_s: float) -> None:
        self.num_waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            # Given up while still waiting: an abort that never ran.
            self.stats.finished_requests["abort"] += 1
            self.stats.e2e_s.observe(asyncio.get_running_loop().time() - arrived_at_s)
            self._end_record(record, "abort")
            raise
        finally:
            self.num_waiting -= 1

    def _on_admitted(self, run: Run, now_s: float) -> None:
        self._running.add(run)
        run.record.cached_tokens = run.cached_tokens
        self.stats.prefix_cache_queries_tokens += run.prompt_tokens
        self.stats.prefix_cache_hits_tokens += run.cached_tokens
        self.stats.queue_s.observe(now_s - run.arrived_at_s)

    def on_token(self, run: Run, token: SimToken, now_s: float) -> None:
        if token.index == 0:
            self.engine.prefill_done(run.generation)
            self.stats.prompt_tokens += run.prompt_tokens
            self.stats.ttft_s.observe(now_s - run.arrived_at_s)
        elif run.last_token_at_s is not None:
            self.stats.inter_token_s.observe(now_s - run.last_token_at_s)
        run.last_token_at_s = now_s
        self.stats.generation_tokens += 1
        run.record.completion_tokens = run.completion_tokens
        if token.finish_reason is not None:
            # Finished in the engine before the last chunks go out, as in vLLM.
            self._close(run, now_s)

    def _close(self, run: Run, now_s: float) -> None:
        """Ends a run once: frees its slot and KV blocks, counts it, closes its record."""
        if run.closed:
            return
        run.closed = True
        reason = run.generation.abort()
        self._running.discard(run)
        self._slots.release()
        self.engine.release(run.generation)
        self.stats.finished_requests[reason] += 1
        self.stats.e2e_s.observe(now_s - run.arrived_at_s)
        self._end_record(run.record, reason)

    def _end_record(self, record: RequestRecord, reason: str) -> None:
        record.finished = True
        record.aborted = reason == "abort"
        record.finish_reason = reason
        record.ended_at_s = self._wall_clock()
