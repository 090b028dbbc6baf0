"""Built-in scorers. Each returns scores in [0, 1], higher is better.

Load scorers answer a list aligned with the candidates and rank them against
each other (min-max: the least loaded gets 1, the most loaded 0, all equal get
1), as llm-d's queue scorer does, so a difference of one request still
separates two idle replicas. Prefix and session scorers answer a dict of the
replicas they favour (the others score 0), which keeps their cost to the few
holders; the profile ignores entries for replicas that are not candidates.

Load scorers are `LoadScorer`s (scheduler/load_totals.py): they say how to
read one replica's load, so the profile can keep their scores current from
the replicas whose load changed instead of recomputing all on each decision.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache

from scheduler.approx_index import ApproxIndex
from scheduler.config import DEFAULT_MODEL, CostParams, ModelConfig
from scheduler.framework import ReplicaId, ReplicaView, SchedRequest, Scores
from scheduler.load_totals import dense_answer
from scheduler.prefix_index import PrefixIndex


def fractions(overlap: dict[ReplicaId, int], total: int) -> Scores:
    """matched / total for each replica in `overlap`."""
    return {rid: matched / total for rid, matched in overlap.items()}


class InFlightRequests:
    """Prefers fewer requests placed here and not yet done (counted at decision time)."""

    name = "in-flight-requests"
    ranked = True

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[float]:
        return dense_answer(self, req, replicas)

    def value(self, model: str, replica: ReplicaView) -> float:
        return replica.in_flight_requests


class InFlightTokens:
    """Prefers fewer tokens in flight here: prompt estimates plus max_tokens."""

    name = "in-flight-tokens"
    ranked = True

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[float]:
        return dense_answer(self, req, replicas)

    def value(self, model: str, replica: ReplicaView) -> float:
        return replica.in_flight_tokens


class QueueDepth:
    """Prefers a shorter waiting queue: the replica's reported `waiting` plus
    the requests placed since that report, which it cannot have counted yet."""

    name = "queue-depth"
    ranked = True

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[float]:
        return dense_answer(self, req, replicas)

    def value(self, model: str, replica: ReplicaView) -> float:
        return replica.waiting + replica.placed_since_report


class KvCacheUsage:
    """Prefers free KV cache: 1 - the reported usage fraction (absolute, not ranked)."""

    name = "kv-cache-usage"
    ranked = False

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[float]:
        return dense_answer(self, req, replicas)

    def value(self, model: str, replica: ReplicaView) -> float:
        return 1.0 - min(1.0, max(0.0, replica.kv_cache_usage))


class SessionTable:
    """session id -> the replica its last request went to; a bounded LRU."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max(1, max_sessions)
        self._replica_of: OrderedDict[str, ReplicaId] = OrderedDict()

    def __len__(self) -> int:
        return len(self._replica_of)

    def get(self, session_id: str) -> ReplicaId | None:
        return self._replica_of.get(session_id)

    def record(self, session_id: str, replica_id: ReplicaId) -> None:
        self._replica_of[session_id] = replica_id
        self._replica_of.move_to_end(session_id)
        if len(self._replica_of) > self.max_sessions:
            self._replica_of.popitem(last=False)


class SessionAffinity:
    """1 for the replica this session's previous request went to, else 0.
    Consumes `session_id` (`x-session-id` or `user`)."""

    name = "session-affinity"

    def __init__(self, sessions: SessionTable) -> None:
        self.sessions = sessions

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> Scores:
        home = self.sessions.get(req.session_id) if req.session_id else None
        return {} if home is None else {home: 1.0}

    def placed(self, req: SchedRequest, replica: ReplicaView) -> None:
        if req.session_id:
            self.sessions.record(req.session_id, replica.id)


# A prompt just sent is remembered by the hashes of its blocks at these
# positions only (1, 2, 4, then every PENDING_STRIDE_BLOCKS, and its last):
# a dozen or two entries per placement instead of one per block, at the price
# of a run found up to a stride short until the KV events give it exactly.
PENDING_STRIDE_BLOCKS = 8


@lru_cache(maxsize=4_096)
def pending_positions(blocks: int) -> tuple[int, ...]:
    """The block counts whose last block marks a prompt of `blocks` blocks."""
    marks = {p for p in (1, 2, 4) if p < blocks}
    marks.update(range(PENDING_STRIDE_BLOCKS, blocks, PENDING_STRIDE_BLOCKS))
    return tuple(sorted(marks | {blocks})) if blocks else ()


class PreciseHoldings:
    """What a replica holds by block hash: its KV events say so, or a prompt
    was sent to it within the pending TTL and its events have not come yet
    (its prefill takes a while; until then a burst sharing the prompt would
    see no replica holding it and spread). Block hashes are chained, so the
    marks of a prompt (`pending_positions`) are a chain too: the pending
    index keeps them like approximate chunks."""

    def __init__(self, events: PrefixIndex, pending: ApproxIndex | None) -> None:
        self.events = events
        # None: only the events count (pending_ttl_s 0).
        self.pending = pending
        # The prompt last scored and what the events said of it, for `record`.
        self._scored: tuple[Sequence[int], dict[ReplicaId, int]] = ((), {})

    def runs(self, blocks: Sequence[int], now_s: float) -> dict[ReplicaId, int]:
        """Each holder's run of `blocks` from block 0 (the longer of the two)."""
        runs = self.events.runs(blocks)
        if self.pending is None:
            return runs
        self._scored = (blocks, dict(runs))
        positions = pending_positions(len(blocks))
        marks = [blocks[p - 1] for p in positions]
        for rid, matched in self.pending.runs(marks, now_s).items():
            if matched and positions[matched - 1] > runs.get(rid, 0):
                runs[rid] = positions[matched - 1]
        return runs

    def record(self, replica_id: ReplicaId, blocks: Sequence[int], now_s: float) -> None:
        if self.pending is None:
            return
        scored, events_runs = self._scored
        if scored is blocks and 2 * events_runs.get(replica_id, 0) >= len(blocks):
            # Its events already show most of the prompt there: what is left is
            # the prompt's own tail, which the events will show before any
            # follow-up (the next turn comes after this one's answer).
            return
        marks = [blocks[p - 1] for p in pending_positions(len(blocks))]
        self.pending.record(replica_id, marks, now_s)


class PrefixPrecise:
    """Fraction of the prompt's blocks, from block 0 without a gap, that the
    replica holds according to its KV events (or, until they come, because
    the prompt was just sent there). Consumes `block_hashes`; a request
    without them (its model has no tokenizer configured) carrying
    `chunk_hashes` is scored, and recorded, as by `prefix-approx`."""

    name = "prefix-precise"

    def __init__(self, holdings: PreciseHoldings, fallback: PrefixApprox) -> None:
        self.holdings = holdings
        self.fallback = fallback

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> Scores:
        blocks = req.block_hashes
        if not blocks:
            return self.fallback.score(req, replicas)
        return fractions(self.holdings.runs(blocks, req.now_s), len(blocks))

    def placed(self, req: SchedRequest, replica: ReplicaView) -> None:
        if req.block_hashes:
            self.holdings.record(replica.id, req.block_hashes, req.now_s)
        else:
            self.fallback.placed(req, replica)


class PrefixApprox:
    """Fraction of the prompt's chunks, from chunk 0, last sent to the replica
    within the TTL. Consumes `chunk_hashes`; records them where the request goes."""

    name = "prefix-approx"

    def __init__(self, index: ApproxIndex) -> None:
        self.index = index

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> Scores:
        chunks = req.chunk_hashes
        if not chunks:
            return {}
        return fractions(self.index.runs(chunks, req.now_s), len(chunks))

    def placed(self, req: SchedRequest, replica: ReplicaView) -> None:
        if req.chunk_hashes:
            self.index.record(replica.id, req.chunk_hashes, req.now_s)


class Cost:
    """Dynamo-style cost, lower is better, turned into a score by min-max scaling
    (so with max-score the cheapest replica wins, ties at random):

        cost = prefill_weight * uncached prompt blocks + decode load in blocks

    Uncached blocks use the precise index when the request carries block hashes,
    else the approximate one. Decode load is the larger of the KV blocks of this
    scheduler's in-flight requests and the replica's reported KV usage (which
    also sees other schedulers' work). Blocks are of the request's model's
    size (`models`). Parameters: `prefill_weight`.
    """

    name = "cost"

    def __init__(self, precise: PreciseHoldings, approx: ApproxIndex, params: CostParams,
                 models: Mapping[str, ModelConfig]) -> None:
        self.precise = precise
        self.approx = approx
        self.prefill_weight = params.prefill_weight
        self.models = models

    ranked = True

    def score(self, req: SchedRequest, replicas: list[ReplicaView]) -> list[float]:
        return dense_answer(self, req, replicas)

    def value(self, model: str, replica: ReplicaView) -> float:
        """Decode load in blocks: the larger of in-flight tokens and reported usage."""
        block_size_tokens = max(1, self.models.get(model, DEFAULT_MODEL).block_size_tokens)
        tokens = replica.in_flight_tokens / block_size_tokens
        used = replica.kv_cache_usage * replica.capacity_blocks
        return tokens if tokens > used else used

    def relief(self, req: SchedRequest) -> Scores:
        """The prefill each holder saves, in blocks. Min-max scaling ignores a
        constant, so the prefill every replica would pay in full is left out
        and only what a holder saves is subtracted from its decode load."""
        block_size_tokens = max(1, self.models.get(req.model, DEFAULT_MODEL).block_size_tokens)
        # A chunk hash stands for one block of text too (prefix-approx's chunking).
        prompt_blocks = max(len(req.block_hashes), len(req.chunk_hashes),
                            math.ceil(req.prompt_tokens / block_size_tokens))
        prefill_blocks = self.prefill_weight * prompt_blocks
        held, of_blocks = self._held_runs(req)
        saved_per_block = prefill_blocks / of_blocks if of_blocks else 0.0
        return {rid: matched * saved_per_block for rid, matched in held.items()}

    def placed(self, req: SchedRequest, replica: ReplicaView) -> None:
        if req.block_hashes:
            self.precise.record(replica.id, req.block_hashes, req.now_s)
        elif req.chunk_hashes:
            self.approx.record(replica.id, req.chunk_hashes, req.now_s)

    def _held_runs(self, req: SchedRequest) -> tuple[dict[ReplicaId, int], int]:
        """Each holder's cached run, and the length it is counted of."""
        if req.block_hashes:
            return self.precise.runs(req.block_hashes, req.now_s), len(req.block_hashes)
        if req.chunk_hashes:
            return self.approx.runs(req.chunk_hashes, req.now_s), len(req.chunk_hashes)
        return {}, 0
