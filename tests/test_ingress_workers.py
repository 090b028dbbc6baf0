"""Several ingress workers on one port (`python -m router --workers N`):
they share the port, /metrics on any of them counts them all, the
supervisor restarts one that dies and stops them all on SIGTERM; and the
overhead header and histogram, on the in-process ingress."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from deploy.procs import LOOPBACK, ChildProcess, free_port
from deploy.replica_fleet import healthy
from router.__main__ import _limits_shared_by
from router.workers import resolve_workers
from scheduler.config import Config, dump_config
from tests.harness import MODEL, PROJECT_DIR, Switchyard, wait_until

BODY = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi there"}]}
OVERHEAD_COUNT = 'switchyard_overhead_seconds_count{route="chat",stream="%s"}'


@pytest.mark.parametrize(("configured", "cpus", "expected"), [
    (0, 1, 1), (0, 2, 2), (0, 16, 2), (0, None, 1), (3, 2, 3), (1, 16, 1)])
def test_workers_resolved(configured: int, cpus: int | None, expected: int) -> None:
    assert resolve_workers(configured, cpus) == expected


@pytest.mark.parametrize(("configured", "workers", "expected"), [(1, 2, 2), (4, 2, 4), (2, 2, 2)])
def test_outage_buckets_take_in_every_worker(configured: int, workers: int,
                                             expected: int) -> None:
    cfg = msgspec.structs.replace(Config(), quota=msgspec.structs.replace(
        Config().quota, ingress_processes=configured))
    assert _limits_shared_by(cfg, workers).quota.ingress_processes == expected


def _overhead_count(text: str, stream: bool) -> float:
    for line in text.splitlines():
        if line.startswith(OVERHEAD_COUNT % ("true" if stream else "false")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _chat(http: aiohttp.ClientSession, api: str, key: str,
                stream: bool = False) -> tuple[Mapping[str, str], float]:
    """One request (must succeed): its response headers and the client's latency in ms."""
    started = time.perf_counter()
    async with http.post(api + "/chat/completions", json={**BODY, "stream": stream},
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers, (time.perf_counter() - started) * 1000


@pytest.mark.integration
async def test_overhead_header_and_histogram(switchyard: Switchyard) -> None:
    api = switchyard.base_url
    metrics_url = api.removesuffix("/v1") + "/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(metrics_url) as resp:
            before = await resp.text()
        for stream in (False, True, False):
            headers, latency_ms = await _chat(http, api, switchyard.api_key, stream)
            overhead_ms = float(headers["x-switchyard-overhead-ms"])
            # The ingress's own time: some, and less than the whole request took.
            assert 0 < overhead_ms < latency_ms
        async with http.get(metrics_url) as resp:
            after = await resp.text()
    assert _overhead_count(after, False) - _overhead_count(before, False) == 2
    assert _overhead_count(after, True) - _overhead_count(before, True) == 1


@pytest_asyncio.fixture
async def two_workers(switchyard: Switchyard, tmp_path: Path) -> AsyncIterator[ChildProcess]:
    """`python -m router --workers 2` for the session's stack, on a port of its own."""
    cfg = msgspec.structs.replace(switchyard.cfg, var_dir=str(tmp_path), ingress=msgspec.structs
                                  .replace(switchyard.cfg.ingress, port=free_port()))
    path = tmp_path / "ingress.json"
    path.write_bytes(dump_config(cfg))
    child = ChildProcess("ingress", [sys.executable, "-m", "router", "--config", str(path),
                                     "--workers", "2"], tmp_path / "ingress.log",
                         env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    await child.start()
    try:
        async with aiohttp.ClientSession() as http:
            await child.wait_ready(lambda: healthy(http, _url(cfg.ingress.port, "/readyz")), 60)
        yield child
    finally:
        await child.stop(timeout_s=30)


def _url(port: int, path: str) -> str:
    return f"http://{LOOPBACK}:{port}{path}"


async def _worker_pids(port: int, expected: set[int], timeout_s: float = 30) -> set[int]:
    """The workers seen answering on `port` until all of `expected` were (or
    the time is up), each request on a new connection (the kernel picks a
    listening socket per connection)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while not expected <= seen and time.monotonic() < deadline:
            try:
                async with http.get(_url(port, "/healthz")) as resp:
                    seen.add((await resp.json())["pid"])
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)  # a worker that just died: its queue was reset
    return seen


def _port(child: ChildProcess) -> int:
    config = Path(child.argv[child.argv.index("--config") + 1])
    return msgspec.json.decode(config.read_bytes())["ingress"]["port"]


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
async def test_workers_share_the_port_and_their_metrics(
        switchyard: Switchyard, two_workers: ChildProcess) -> None:
    port = _port(two_workers)
    workers = _children(two_workers.pid or 0)
    assert len(workers) == 2
    # Both listen on the port: connections spread over them.
    assert await _worker_pids(port, workers) == workers
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(8):
            headers, _ = await _chat(http, _url(port, "/v1"), switchyard.api_key, i % 2 == 1)
            assert float(headers["x-switchyard-overhead-ms"]) > 0
        # Whichever worker answers /metrics counts every worker's requests.
        for _ in range(6):
            async with http.get(_url(port, "/metrics")) as resp:
                text = await resp.text()
            assert _overhead_count(text, False) == 4 and _overhead_count(text, True) == 4


@pytest.mark.integration
async def test_a_dead_worker_is_replaced_and_sigterm_stops_all(
        switchyard: Switchyard, two_workers: ChildProcess) -> None:
    port = _port(two_workers)
    supervisor = two_workers.pid or 0
    first = _children(supervisor)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        now = _children(supervisor)
        return len(now) == 2 and victim not in now

    await wait_until(replaced, 30)
    # The new worker serves once it listens; the other served meanwhile.
    workers = _children(supervisor)
    assert await _worker_pids(port, workers) == workers
    assert two_workers.proc is not None
    two_workers.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(two_workers.proc.wait(), 30) == 0
    assert not any(_alive(pid) for pid in workers)


@pytest.mark.integration
async def test_workers_end_with_a_killed_supervisor(two_workers: ChildProcess) -> None:
    workers = _children(two_workers.pid or 0)
    assert len(workers) == 2 and two_workers.proc is not None
    two_workers.proc.kill()
    await two_workers.proc.wait()

    async def gone() -> bool:
        return not any(_alive(pid) for pid in workers)

    await wait_until(gone, 30)
