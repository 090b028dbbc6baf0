"""The routing benchmark's client: replays a trace open-loop against the
ingress (one aiohttp session, streaming), measuring each request's TTFT and
inter-token latency, and summarises a run.

Open loop: each request is sent at its planned time whether or not earlier
ones finished (a follow-up turn of a chat waits for its previous turn, then
its think time). Requests still unanswered at the deadline are cancelled and
count as missing their SLO, with an infinite TTFT.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import msgspec

from loadtests.routing_trace import TraceRequest
from scheduler.replica_metrics import parse_metrics

MODEL = "switchyard-tiny"


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float = 1.0
    mean_itl_s: float = 0.2


@dataclass(slots=True)
class Outcome:
    status: int = 0
    sent_at_s: float = 0.0
    first_token_at_s: float = 0.0
    last_token_at_s: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    group: str = ""

    @property
    def ttft_s(self) -> float:
        return self.first_token_at_s - self.sent_at_s if self.first_token_at_s else math.inf

    @property
    def mean_itl_s(self) -> float:
        if self.tokens < 2:
            return 0.0
        return (self.last_token_at_s - self.first_token_at_s) / (self.tokens - 1)

    def complete(self) -> bool:
        return self.status == 200 and self.last_token_at_s > 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class _Chunk(msgspec.Struct):
    choices: list[dict[str, object]] = []
    usage: _Usage | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


async def _send(session: aiohttp.ClientSession, url: str, key: str, req: TraceRequest,
                session_header: bool, out: Outcome) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    if session_header:
        headers["x-session-id"] = req.group
    body = {"model": MODEL, "messages": list(req.messages), "max_tokens": req.max_tokens,
            "min_tokens": req.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out.group = req.group
    out.sent_at_s = time.monotonic()
    async with session.post(url, json=body, headers=headers) as resp:
        out.replica = resp.headers.get("x-switchyard-replica", "")
        if resp.status != 200:
            await resp.read()
            out.status = resp.status
            return
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = _chunk_decoder.decode(line[6:])
            if chunk.choices:
                now_s = time.monotonic()
                out.first_token_at_s = out.first_token_at_s or now_s
                out.last_token_at_s = now_s
                out.tokens += 1
            elif chunk.usage is not None:
                out.prompt_tokens = chunk.usage.prompt_tokens
                out.cached_tokens = (chunk.usage.prompt_tokens_details or {}).get(
                    "cached_tokens", 0)
        out.status = 200


async def replay(api_url: str, key: str, trace: Sequence[TraceRequest], deadline_s: float,
                 session_header: bool) -> tuple[list[Outcome], float]:
    """Sends the trace; returns each request's outcome and the run's wall time."""
    outcomes = [Outcome() for _ in trace]
    finished = [asyncio.Event() for _ in trace]
    url = api_url + "/chat/completions"
    started_s = time.monotonic()

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        req = trace[index]
        try:
            if req.after >= 0:
                await finished[req.after].wait()
                await asyncio.sleep(req.at_s)
            else:
                await asyncio.sleep(max(0.0, started_s + req.at_s - time.monotonic()))
            await _send(session, url, key, req, session_header, outcomes[index])
        except (aiohttp.ClientError, msgspec.DecodeError):
            outcomes[index].status = -1
        finally:
            finished[index].set()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(one(i, session), name=f"bench-req-{i}")
                 for i in range(len(trace))]
        try:
            await asyncio.wait(tasks, timeout=deadline_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    last_s = max((o.last_token_at_s for o in outcomes if o.last_token_at_s), default=started_s)
    return outcomes, last_s - started_s


async def tokenize(url: str, trace: Sequence[TraceRequest], parallel: int = 8) -> list[list[int]]:
    """Each request's prompt token ids as the replica at `url` builds them
    (its /tokenize: the tokenizer and chat template the engine hashes)."""
    limit = asyncio.Semaphore(parallel)

    async def one(session: aiohttp.ClientSession, req: TraceRequest) -> list[int]:
        async with limit, session.post(url + "/tokenize", json={
                "model": MODEL, "messages": list(req.messages),
                "add_generation_prompt": True}) as resp:
            resp.raise_for_status()
            return (await resp.json())["tokens"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return list(await asyncio.gather(*(one(session, req) for req in trace)))


async def prefix_counters(urls: Sequence[str]) -> tuple[int, int]:
    """Sum over replicas of (vllm:prefix_cache_hits_total, queries_total), in tokens."""
    hits = queries = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for url in urls:
            async with session.get(url + "/metrics") as resp:
                metrics = parse_metrics(await resp.text())
            hits += metrics.prefix_cache_hits_tokens
            queries += metrics.prefix_cache_queries_tokens
    return hits, queries


def quantile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(outcomes: Sequence[Outcome], wall_s: float, slo: Slo, hits: int,
              queries: int, oracle: float, warm_after_s: float) -> dict[str, float]:
    """`warm_after_s`: requests sent this long after the first one count in the
    warm-cache TTFT p90 (which leaves out the cold start of every run)."""
    ttfts = [o.ttft_s for o in outcomes]
    first_sent_s = min((o.sent_at_s for o in outcomes if o.sent_at_s), default=0.0)
    warm = [o.ttft_s for o in outcomes if o.sent_at_s >= first_sent_s + warm_after_s]
    done = [o for o in outcomes if o.complete()]
    good = [o for o in done if o.ttft_s <= slo.ttft_s and o.mean_itl_s <= slo.mean_itl_s]
    spread = Counter(o.replica for o in outcomes if o.replica)
    homes: dict[str, set[str]] = {}
    for o in outcomes:
        if o.replica:
            homes.setdefault(o.group, set()).add(o.replica)
    hit_rate = hits / queries if queries else 0.0
    prompt_tokens = sum(o.prompt_tokens for o in done)
    return {
        "requests": len(outcomes), "completed": len(done),
        "failed": sum(1 for o in outcomes if o.status not in (0, 200)),
        "unfinished": sum(1 for o in outcomes if o.status == 0),
        "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p90_s": quantile(ttfts, 0.9),
        "ttft_p99_s": quantile(ttfts, 0.99), "warm_ttft_p90_s": quantile(warm, 0.9),
        "itl_mean_p50_s": quantile([o.mean_itl_s for o in done], 0.5),
        "throughput_rps": len(done) / wall_s if wall_s else 0.0,
        "goodput_rps": len(good) / wall_s if wall_s else 0.0,
        "hit_rate": hit_rate, "oracle_hit_rate": oracle,
        "hit_of_oracle": hit_rate / oracle if oracle else math.nan,
        "client_cached_fraction": (sum(o.cached_tokens for o in done) / prompt_tokens
                                   if prompt_tokens else 0.0),
        "busiest_replica_share": max(spread.values()) / sum(spread.values()) if spread else 0.0,
        # How many replicas each prefix group (tenant, session) was sent to: 1 is ideal.
        "replicas_per_group": (statistics.fmean(map(len, homes.values())) if homes
                               else 0.0),
        "wall_s": wall_s,
    }
