"""Shared fixtures: real nats-server, redis-server and Ray, started on free
loopback ports once per session and stopped after; guards that fail a test
which blocks the event loop or leaks tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import uvloop

from deploy.procs import start_nats, start_redis

# Longest the event loop may go without turning; ample for a loaded 2-core
# machine, far below what a blocking call (ray.get, time.sleep, sync I/O) costs.
MAX_LOOP_STALL_S = 0.5


@pytest.fixture(scope="session")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("switchyard")


@pytest_asyncio.fixture(scope="session")
async def nats_url(session_dir: Path) -> AsyncIterator[str]:
    proc, url = await start_nats(session_dir / "nats", session_dir / "logs")
    yield url
    await proc.stop()


@pytest_asyncio.fixture(scope="session")
async def redis_url(session_dir: Path) -> AsyncIterator[str]:
    proc, url = await start_redis(session_dir / "redis", session_dir / "logs", persist=False)
    yield url
    await proc.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    from actors.ray_runtime import init_local_ray, shutdown_ray

    init_local_ray(num_cpus=2, namespace="switchyard-test")
    yield
    shutdown_ray()


class _LoopWatch:
    """Records the longest gap between ticks of a 10 ms heartbeat while the
    test body runs (armed). The loop also pauses between fixtures, when it is
    not running at all; the first tick after arming is dropped for that."""

    def __init__(self) -> None:
        self.worst_stall_s = 0.0
        self._armed = False
        self._skip_next = False
        self._task: asyncio.Task[None] | None = None

    def arm(self, armed: bool) -> None:
        self._armed = armed
        self._skip_next = armed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="loop-watch")

    async def _beat(self) -> None:
        interval_s = 0.01
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval_s)
            if self._skip_next:
                self._skip_next = False
            elif self._armed:
                self.worst_stall_s = max(self.worst_stall_s, time.monotonic() - before - interval_s)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


_WATCH = pytest.StashKey[_LoopWatch]()


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    watch = pyfuncitem.stash.get(_WATCH, None)
    if watch is not None:
        watch.arm(True)
    try:
        return (yield)
    finally:
        if watch is not None:
            watch.arm(False)


@pytest_asyncio.fixture(autouse=True)
async def loop_guard(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fails a test that blocks the loop, or that leaves tasks running."""
    before = set(asyncio.all_tasks())
    watch = _LoopWatch()
    watch.start()
    request.node.stash[_WATCH] = watch
    yield
    await watch.stop()
    deadline = time.monotonic() + 2.0
    while True:
        leaked = {t for t in asyncio.all_tasks() - before if not t.done()}
        leaked.discard(asyncio.current_task())
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert not leaked, f"test leaked tasks: {sorted(t.get_name() for t in leaked)}"
    if "allow_loop_stall" not in request.keywords:
        assert watch.worst_stall_s < MAX_LOOP_STALL_S, (
            f"event loop blocked for {watch.worst_stall_s:.3f} s")
