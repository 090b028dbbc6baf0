"""One simulated vLLM replica: the async shell around the pure engine core.

An engine-loop task (owned by the replica: start/aclose) runs engine steps
back to back while there is work: it takes a step, sleeps for the step's
simulated duration (scaled by time_scale), then hands the step's tokens to
the requests' streams and its KV events to the publisher. HTTP handlers read
their request's stream; a handler that leaves early aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry

from deploy.tiny_model import TINY_MODEL_DIR
from loadtests.simulator.detokenizer import IncrementalDetokenizer
from loadtests.simulator.engine import EngineCore, EngineRequest, TokenOutput
from loadtests.simulator.faults import FaultSpec
from loadtests.simulator.kv_publisher import KvEventPublisher
from loadtests.simulator.ledger import RequestLedger, RequestRecord
from loadtests.simulator.metrics import CacheInfo, EngineGauges, ReplicaCollector, ReplicaStats
from loadtests.simulator.sampling import SamplingLimits, Vocabulary
from loadtests.simulator.shapes import UsageCounts
from loadtests.simulator.truth_log import TruthLog
from router.prompt_tokens import ModelTokenizer, load_tokenizer
from scheduler.config import SimulatorConfig

log = logging.getLogger(__name__)
# The vLLM release whose API the simulator reproduces.
VLLM_VERSION = "0.32.0"


@dataclass(frozen=True)
class SimToken:
    index: int
    token_id: int
    # "" while the token completes no character, and for special tokens, as in vLLM.
    text: str
    finish_reason: str | None


class Run:
    """An admitted request's stream of tokens, read by its handler."""

    def __init__(self, request: EngineRequest, record: RequestRecord,
                 detokenizer: IncrementalDetokenizer, stall_after_tokens: int | None) -> None:
        self.request = request
        self.record = record
        self.stall_after_tokens = stall_after_tokens
        self.last_token_at_s: float | None = None
        # Set when the token that ends the request has been handed over.
        self.finish_delivered: str | None = None
        self.closed = False
        self._detokenizer = detokenizer
        # At most max_tokens tokens ever arrive.
        self._tokens: asyncio.Queue[TokenOutput] = asyncio.Queue(request.limits.max_tokens)
        self._read = 0
        self._finished = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        return max(self.request.cached_tokens, 0)

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason if self._finished else None

    @property
    def delivered_tokens(self) -> int:
        return self.record.completion_tokens

    def usage(self, completion_tokens: int | None = None) -> UsageCounts:
        """Usage as the response reports it; completion tokens default to those read."""
        return UsageCounts(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self._read if completion_tokens is None else completion_tokens,
            cached_tokens=self.cached_tokens,
            created_cache_tokens=self.request.created_cache_tokens,
        )

    def deliver(self, output: TokenOutput) -> None:
        self._tokens.put_nowait(output)

    async def next_token(self) -> SimToken | None:
        """The next token once its step is done; None after the last one."""
        if self._finished:
            return None
        output = await self._tokens.get()
        self._read += 1
        self._finished = output.finish_reason is not None
        text = self._detokenizer.step(output.token_id)
        return SimToken(self._read - 1, output.token_id, text, output.finish_reason)


class SimReplica:
    """Engine, streams, counters and ground truth of one replica."""

    def __init__(
        self,
        cfg: SimulatorConfig,
        *,
        index: int = 0,
        tokenizer: ModelTokenizer | None = None,
        wall_clock: Callable[[], float] = time.time,
        truth_log: TruthLog | None = None,
    ) -> None:
        """`truth_log`: where each token and end of a request is also written
        (ground truth that outlives the process)."""
        self.cfg = cfg
        self.truth_log = truth_log
        self.index = index
        self.model = cfg.model
        self.tokenizer = tokenizer or load_tokenizer(
            cfg.tokenizer_dir or str(TINY_MODEL_DIR))
        tok = self.tokenizer
        self.engine = EngineCore(cfg, Vocabulary.of(tok.vocab_size, tok.eos_token_id,
                                                    tok.special_ids))
        self.ledger = RequestLedger()
        self.stats = ReplicaStats()
        # vLLM's default fingerprint: its version and a hash of its config.
        config_hash = hashlib.sha256(msgspec.json.encode(cfg)).hexdigest()[:8]
        self.system_fingerprint = f"vllm-{VLLM_VERSION}-{config_hash}"
        self.faults = FaultSpec()
        self.in_flight_requests = 0
        self.publisher = (KvEventPublisher(cfg, index, wall_clock=wall_clock)
                          if cfg.kv_events_endpoint else None)
        # A registry per replica: several replicas share one process.
        self.registry = CollectorRegistry(auto_describe=False)
        cache_info = CacheInfo(cfg.block_size_tokens, cfg.cache_blocks,
                               cfg.enable_prefix_caching, cfg.prefix_caching_hash_algo)
        self.registry.register(ReplicaCollector(cfg.model, self.stats, self.gauges, cache_info,
                                                created_s=wall_clock()))
        self._wall_clock = wall_clock
        self._runs: dict[EngineRequest, Run] = {}
        self._work = asyncio.Event()
        self._ready_at_s = 0.0
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.publisher is not None:
            await self.publisher.start()
        self._loop_task = asyncio.create_task(self._engine_loop(), name=f"sim-engine-{self.index}")

    async def aclose(self) -> None:
        """Stops the engine loop and the publisher; unfinished requests end as aborted."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        now_s = asyncio.get_running_loop().time()
        for run in list(self._runs.values()):
            self._close(run, now_s)
        if self.publisher is not None:
            await self.publisher.aclose()

    def set_faults(self, faults: FaultSpec) -> None:
        self.faults = faults
        self._ready_at_s = asyncio.get_running_loop().time() + faults.slow_start_s

    def starting(self) -> bool:
        """True during a simulated slow start."""
        return asyncio.get_running_loop().time() < self._ready_at_s

    def gauges(self) -> EngineGauges:
        engine = self.engine
        return EngineGauges(
            num_running=engine.num_running,
            num_waiting=engine.num_waiting,
            kv_cache_usage_perc=engine.pool.usage(),
            num_preemptions=engine.stats.num_preemptions,
            prefix_cache_queries_tokens=engine.stats.prefix_cache_queries_tokens,
            prefix_cache_hits_tokens=engine.stats.prefix_cache_hits_tokens,
        )

    def server_load(self) -> int:
        """Generation requests in flight, as vLLM's /load counts them."""
        return self.in_flight_requests

    @contextlib.contextmanager
    def counting_load(self) -> Iterator[None]:
        self.in_flight_requests += 1
        try:
            yield
        finally:
            self.in_flight_requests -= 1

    @contextlib.asynccontextmanager
    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], limits: SamplingLimits,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Run]:
        """Queues the request in the engine and yields its Run; leaving early aborts it."""
        loop = asyncio.get_running_loop()
        record = RequestRecord(request_id=request_id, prompt_tokens=len(prompt_ids),
                               cache_salt=cache_salt or "", started_at_s=self._wall_clock())
        self.ledger.add(record)
        self._journal(record)
        arrived_at_s = loop.time()
        if self.faults.hang_before_first_byte:
            try:
                # Until the client gives up and cancels the handler.
                await asyncio.Event().wait()
            finally:
                self._count_finish("abort", loop.time() - arrived_at_s)
                self._end_record(record, "abort")
        if self.cfg.request_overhead_ms:
            # The API server's own work before the engine sees the request.
            await asyncio.sleep(self.cfg.request_overhead_ms * self.cfg.time_scale / 1000)
        request = self.engine.add_request(prompt_ids, limits, arrived_at_s, cache_salt)
        run = Run(request, record, IncrementalDetokenizer(self.tokenizer.tokenizer, prompt_ids),
                  self.faults.stall_after_tokens)
        self._runs[request] = run
        self._work.set()
        try:
            yield run
        finally:
            self._close(run, loop.time())

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            result = self.engine.step(loop.time())
            if result is None:
                self._work.clear()
                continue
            await asyncio.sleep(result.duration_s * self.cfg.time_scale)
            now_s = loop.time()
            for output in result.outputs:
                self._deliver(output, now_s)
            if result.events and self.publisher is not None:
                self.publisher.publish(result.events)

    def _deliver(self, output: TokenOutput, now_s: float) -> None:
        run = self._runs.get(output.request)
        if run is None:
            return  # aborted while its step ran
        if run.stall_after_tokens is not None and run.delivered_tokens >= run.stall_after_tokens:
            # The stream goes silent here; the handler waits until its client leaves.
            self.engine.abort(run.request)
            del self._runs[run.request]
            return
        run.deliver(output)
        self._observe_token(run, now_s)
        if output.finish_reason is not None:
            run.finish_delivered = output.finish_reason
            self._close(run, now_s)

    def _observe_token(self, run: Run, now_s: float) -> None:
        request, record, stats = run.request, run.record, self.stats
        if run.last_token_at_s is None:
            stats.prompt_tokens += run.prompt_tokens
            stats.ttft_s.observe(now_s - request.arrived_at_s)
            if request.first_scheduled_at_s is not None:
                stats.queue_s.observe(request.first_scheduled_at_s - request.arrived_at_s)
        else:
            stats.inter_token_s.observe(now_s - run.last_token_at_s)
        run.last_token_at_s = now_s
        stats.generation_tokens += 1
        record.completion_tokens += 1
        self._copy_engine_truth(run)
        self._journal(record)

    def _close(self, run: Run, now_s: float) -> None:
        """Ends a run once: the engine drops it if unfinished; counts it; closes its record."""
        if run.closed:
            return
        run.closed = True
        self._runs.pop(run.request, None)
        self.engine.abort(run.request)
        self._copy_engine_truth(run)
        # Finished in the engine while its last step ran, or never: an abort to the client.
        reason = run.finish_delivered or "abort"
        self._count_finish(reason, now_s - run.request.arrived_at_s)
        self._end_record(run.record, reason)

    def _copy_engine_truth(self, run: Run) -> None:
        record, request = run.record, run.request
        record.cached_tokens = max(request.cached_tokens, 0)
        record.computed_prompt_tokens = request.computed_prompt_tokens
        record.preemptions = request.num_preemptions

    def _count_finish(self, reason: str, e2e_s: float) -> None:
        self.stats.finished_requests[reason] += 1
        self.stats.e2e_s.observe(e2e_s)

    def _end_record(self, record: RequestRecord, reason: str) -> None:
        record.finished = True
        record.aborted = reason == "abort"
        record.finish_reason = reason
        record.ended_at_s = self._wall_clock()
        self._journal(record)

    def _journal(self, record: RequestRecord) -> None:
        if self.truth_log is not None:
            self.truth_log.note(record)
