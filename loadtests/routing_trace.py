"""Seeded request traces for the routing benchmark, and the offline oracle.

Workloads (every prompt is a chat; text is drawn from the tiny model's
whole-word vocabulary, so one word is one token):

- A, shared system prompts: `tenants` tenants, each with its own long system
  prompt; each request is one tenant's prompt plus a short unique question.
  The number of tenants is chosen so that their prefixes together fill
  `fill` of the fleet's KV cache (llm-d's published setup: 73 %), which is
  several times one replica's cache.
- B, multi-turn chat: sessions arrive at random; each has 4-8 turns, a turn
  sent a think time after the previous one finished, its prompt being the
  whole conversation so far (scripted assistant answers, so every policy
  replays the same prompts) plus a new user message.
- C, no sharing: every prompt is unique.

Oracle: the best prefix-cache hit rate the same fleet could reach on the same
trace, computed offline with perfect knowledge. Every prefix group (a tenant
in A, a session in B, a request in C) is pinned to one replica, the groups
assigned largest footprint first to the replica with the fewest blocks
assigned so far (capacity-aware balancing); each replica then replays its
requests in trace order through an LRU cache of its usable blocks
(`cache_blocks - 1`, the null block excluded) with vLLM's hit rule: the
longest run of leading full blocks already cached, at most
`(prompt_tokens - 1) // block_size` blocks. Blocks held by running requests
and load balance are ignored, so real routing can only come close to it.
"""

from __future__ import annotations

import json
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deploy.tiny_model import TINY_MODEL_DIR

Messages = tuple[dict[str, str], ...]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    # When to send it, seconds from the run's start; for a follow-up turn, seconds
    # after turn `after` (an index into the trace) finished.
    at_s: float
    group: str
    messages: Messages
    max_tokens: int
    after: int = -1


@dataclass(frozen=True, slots=True)
class FleetShape:
    replicas: int
    cache_blocks: int
    block_size_tokens: int

    @property
    def usable_blocks(self) -> int:
        return self.cache_blocks - 1


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str
    # Arrivals (requests in A and C, sessions in B) per second per replica.
    rate_per_replica: float
    duration_s: float
    max_tokens: int = 16
    prefix_tokens: int = 1_000   # A: system prompt length
    fill: float = 0.73           # A: tenants' prefixes / fleet KV capacity
    question_tokens: int = 24    # A and B: user message length
    answer_tokens: int = 60      # B: scripted assistant answer length
    think_s: float = 1.0         # B: mean pause between turns
    unique_tokens: tuple[int, int] = (500, 1_000)  # C: prompt length range


def vocabulary() -> list[str]:
    """Whole words of the tiny model's tokenizer (each one token after a space)."""
    vocab = json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(token[1:] for token in vocab if re.fullmatch(r"Ġ[a-z]{3,}", token))


def tenant_count(spec: WorkloadSpec, shape: FleetShape) -> int:
    prefix_blocks = spec.prefix_tokens // shape.block_size_tokens
    return max(2, round(spec.fill * shape.replicas * shape.usable_blocks / prefix_blocks))


def build_trace(spec: WorkloadSpec, shape: FleetShape, seed: int) -> list[TraceRequest]:
    rng = random.Random(f"{spec.name}-{seed}")
    words = vocabulary()

    def text(tokens: int) -> str:
        return " ".join(rng.choice(words) for _ in range(tokens))

    rate_per_s = spec.rate_per_replica * shape.replicas
    arrivals_s = []
    t_s = rng.expovariate(rate_per_s)
    while t_s < spec.duration_s:
        arrivals_s.append(t_s)
        t_s += rng.expovariate(rate_per_s)
    if spec.name == "A":
        prompts = [text(spec.prefix_tokens) for _ in range(tenant_count(spec, shape))]
        trace = []
        for at_s in arrivals_s:
            tenant = rng.randrange(len(prompts))
            trace.append(TraceRequest(at_s, f"tenant-{tenant}", (
                {"role": "system", "content": prompts[tenant]},
                {"role": "user", "content": text(spec.question_tokens)}), spec.max_tokens))
        return trace
    if spec.name == "B":
        return _sessions(spec, arrivals_s, rng, text)
    if spec.name == "C":
        return [TraceRequest(at_s, f"request-{i}", (
            {"role": "user", "content": text(rng.randint(*spec.unique_tokens))},),
            spec.max_tokens) for i, at_s in enumerate(arrivals_s)]
    raise ValueError(f"unknown workload {spec.name!r}")


def _sessions(spec: WorkloadSpec, starts_s: list[float], rng: random.Random,
              text: Callable[[int], str]) -> list[TraceRequest]:
    trace: list[TraceRequest] = []
    for n, start_s in enumerate(starts_s):
        history: list[dict[str, str]] = [
            {"role": "system", "content": f"Session {n}. " + text(40)}]
        previous = -1
        for turn in range(rng.randint(4, 8)):
            history.append({"role": "user", "content": text(spec.question_tokens)})
            at_s = start_s if turn == 0 else rng.expovariate(1 / spec.think_s)
            trace.append(TraceRequest(at_s, f"session-{n}", tuple(history), spec.max_tokens,
                                      after=previous))
            previous = len(trace) - 1
            history.append({"role": "assistant", "content": text(spec.answer_tokens)})
    return trace


def planned_order(trace: Sequence[TraceRequest]) -> list[int]:
    """Indexes in the order the requests would be sent if each took no time."""
    when_s: list[float] = []
    for req in trace:
        when_s.append(req.at_s + (when_s[req.after] if req.after >= 0 else 0.0))
    return sorted(range(len(trace)), key=when_s.__getitem__)


def block_chains(prompts: Sequence[Sequence[int]], block_size: int) -> list[tuple[int, list[int]]]:
    """(prompt tokens, chain ids of its full blocks) of each prompt."""
    chains = []
    for ids in prompts:
        chain, parent = [], 0
        for start in range(0, len(ids) - block_size + 1, block_size):
            parent = hash((parent, tuple(ids[start:start + block_size])))
            chain.append(parent)
        chains.append((len(ids), chain))
    return chains


def oracle_hit_rate(trace: Sequence[TraceRequest], prompts: Sequence[Sequence[int]],
                    shape: FleetShape) -> float:
    """Hit tokens / prompt tokens of the oracle described in the module
    docstring; `prompts` are the requests' prompt token ids as a replica
    tokenizes them (its /tokenize)."""
    chains = block_chains(prompts, shape.block_size_tokens)
    footprint: dict[str, set[int]] = {}
    for req, (_, chain) in zip(trace, chains, strict=True):
        footprint.setdefault(req.group, set()).update(chain)
    assigned_blocks = [0] * shape.replicas
    replica_of: dict[str, int] = {}
    for group in sorted(footprint, key=lambda g: (-len(footprint[g]), g)):
        replica = min(range(shape.replicas), key=assigned_blocks.__getitem__)
        replica_of[group] = replica
        assigned_blocks[replica] += len(footprint[group])
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(shape.replicas)]
    hit_tokens = query_tokens = 0
    for index in planned_order(trace):
        prompt_tokens, chain = chains[index]
        cache = caches[replica_of[trace[index].group]]
        hit_blocks = 0
        for block in chain[:(prompt_tokens - 1) // shape.block_size_tokens]:
            if block not in cache:
                break
            hit_blocks += 1
        hit_tokens += hit_blocks * shape.block_size_tokens
        query_tokens += prompt_tokens
        # Tail first, so the head ends most recently used and is evicted last (as vLLM frees).
        for block in reversed(chain):
            cache[block] = None
            cache.move_to_end(block)
        while len(cache) > shape.usable_blocks:
            cache.popitem(last=False)
    return hit_tokens / query_tokens if query_tokens else 0.0
