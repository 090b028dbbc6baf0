"""Bounded asyncio load for the overhead benchmark: an open-loop generator on
a fixed schedule (requests leave at their times whatever the answers do),
a closed loop of N clients for throughput, and SSE chunk counting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

# A request that takes longer than this counts as failed (the runs stay bounded).
REQUEST_TIMEOUT_S = 10.0


@dataclass
class Sample:
    ok: bool
    # From the moment the request left: first SSE event (or the whole body), end.
    first_ms: float = 0.0
    total_ms: float = 0.0
    chunks: int = 0
    overhead_ms: float | None = None
    # Why it failed: "HTTP <status>" or the exception's name ("" when ok).
    failure: str = ""


@dataclass
class Client:
    session: aiohttp.ClientSession
    headers: dict[str, str] = field(default_factory=dict)
    # SSE events received so far, counted as they arrive.
    chunks_seen: int = 0

    async def send(self, url: str, body: bytes, stream: bool) -> Sample:
        started = time.perf_counter()
        first = 0.0
        chunks = 0
        try:
            async with self.session.post(url, data=body, headers=self.headers) as resp:
                if stream:
                    async for data in resp.content.iter_any():
                        if not first:
                            first = time.perf_counter()
                        seen = data.count(b"data:")
                        chunks += seen
                        self.chunks_seen += seen
                else:
                    await resp.read()
                    first = time.perf_counter()
                ok = resp.status == 200
                overhead = resp.headers.get("x-switchyard-overhead-ms")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Sample(ok=False, failure=type(exc).__name__)
        end = time.perf_counter()
        return Sample(ok, (first - started) * 1000, (end - started) * 1000, chunks,
                      float(overhead) if overhead is not None else None,
                      "" if ok else f"HTTP {resp.status}")


def new_client(headers: dict[str, str] | None = None) -> Client:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(
        connector=connector, headers={"Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
    return Client(session, dict(headers or {}))


@dataclass
class OpenLoopResult:
    samples: list[Sample]
    # How late the generator started requests behind their schedule (p99).
    lag_p99_ms: float


async def open_loop(send: Callable[[], Awaitable[Sample]], rate_rps: float,
                    seconds: float) -> OpenLoopResult:
    """`rate_rps` requests per second for `seconds`, each started at its time."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate_rps * seconds))
    start = loop.time() + 0.01
    tasks = []
    lags = []
    for i in range(count):
        due = start + i / rate_rps
        delay = due - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        lags.append(max(0.0, loop.time() - due) * 1000)
        tasks.append(asyncio.create_task(send()))
    samples = list(await asyncio.gather(*tasks))
    lags.sort()
    return OpenLoopResult(samples, lags[int(0.99 * (len(lags) - 1))])


@dataclass
class ClosedLoopResult:
    ok: int
    failed: int
    seconds: float
    # SSE events that arrived inside the window (requests still running included).
    chunks: int

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds


async def closed_loop(send: Callable[[], Awaitable[Sample]], clients: int, seconds: float,
                      chunk_counter: Callable[[], int] = lambda: 0) -> ClosedLoopResult:
    """`clients` clients, each sending its next request when the last ended,
    for `seconds`; counts the requests that ended inside the window, and the
    growth of `chunk_counter` over it."""
    loop = asyncio.get_running_loop()
    end_at = loop.time() + seconds
    result = ClosedLoopResult(0, 0, seconds, -chunk_counter())

    def window_closed() -> None:
        result.chunks += chunk_counter()

    timer = loop.call_at(end_at, window_closed)

    async def client() -> None:
        while loop.time() < end_at:
            sample = await send()
            if loop.time() > end_at:
                return
            if sample.ok:
                result.ok += 1
            else:
                result.failed += 1

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        timer.cancel()
    return result
