"""Shared fixtures: real nats-server, redis-server and Ray, started on free
loopback ports once per session and stopped after; guards that fail a test
which blocks the event loop or leaks tasks."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
import uvloop
from nats.aio.client import Client as NATS

from deploy.procs import running_children, start_nats, start_redis
from tests.harness import PROJECT_DIR, Switchyard, make_config, start_switchyard

pytest_plugins = ["tests.fixtures_vllm"]

# Longest the event loop may go without turning; ample for a loaded 2-core
# machine, far below what a blocking call (ray.get, time.sleep, sync I/O) costs.
MAX_LOOP_STALL_S = 0.5
# Real vLLM's engine spins on both cores while it works and can starve this
# process that long; a blocking call in our code still shows up above it.
MAX_LOOP_STALL_WITH_VLLM_S = 2.0
# uvloop's close() runs the loop until every libuv handle is closed, and the
# handle of a child process stays open until the child exits: a server a
# test left running hangs the session's last teardown. The session's end
# stops and reports such children; should the last teardown hang anyway, a
# watchdog (armed before it starts) ends the run with pytest's verdict and
# every thread's stack instead of hanging CI until its time limit.
TEARDOWN_WATCHDOG_S = 120.0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is not None:
        return
    session = item.session

    def hung() -> None:
        sys.stderr.write(f"\nteardown still running after {TEARDOWN_WATCHDOG_S:.0f} s "
                         f"({session.testsfailed} failed of {session.testscollected}); "
                         "stacks follow, exiting with that verdict\n")
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1 if session.testsfailed else 0)

    watchdog = threading.Timer(TEARDOWN_WATCHDOG_S, hung)
    watchdog.daemon = True
    watchdog.start()


def pytest_configure(config: pytest.Config) -> None:
    """Tests run on uvloop, like the services. Through the policy, not
    pytest-asyncio's loop-factory hook: the hook parametrizes only async
    tests, so a sync test in between tore the session's loop down and built
    another mid-run, and closing a uvloop loop with the session's servers
    still on it could hang in epoll."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("switchyard")


@pytest_asyncio.fixture(scope="session")
async def nats_url(session_dir: Path) -> AsyncIterator[str]:
    proc, url = await start_nats(session_dir / "nats", session_dir / "logs")
    yield url
    await proc.stop()


@pytest_asyncio.fixture(scope="module")
async def private_bus(session_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A nats-server of the test module's own, so the session's scheduler
    actor does not hear (or answer) what the module publishes."""
    name = request.module.__name__.rpartition(".")[2]
    proc, url = await start_nats(session_dir / f"{name}-nats", session_dir / "logs" / name)
    yield url
    await proc.stop()


@pytest_asyncio.fixture
async def nc(private_bus: str) -> AsyncIterator[NATS]:
    """A client of the module's private nats-server."""
    client = await nats.connect(private_bus)
    yield client
    await client.drain()


@pytest_asyncio.fixture(scope="session")
async def redis_url(session_dir: Path) -> AsyncIterator[str]:
    proc, url = await start_redis(session_dir / "redis", session_dir / "logs", persist=False)
    yield url
    await proc.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    from actors.ray_runtime import init_local_ray, shutdown_ray

    init_local_ray(num_cpus=2, namespace="switchyard-test")
    _warm_ray()
    yield
    shutdown_ray()


def _warm_ray() -> None:
    """Ray imports pyarrow and numpy when this process first serializes for
    a task or an actor: here, outside the loop, not in the first test that
    creates an actor (where it held the loop for over half a second)."""
    import ray

    ray.get(ray.remote(_noop).remote())
    _freeze_heap()


def _freeze_heap() -> None:
    """Moves every object alive now out of the cyclic collector's reach: a
    full collection over the session's heap (Ray, pyarrow, the test modules)
    took over half a second, on whatever test's loop it happened to run."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    _freeze_heap()


def _noop() -> None:
    """A task for _warm_ray."""


class _LoopWatch:
    """Records the longest gap between ticks of a 10 ms heartbeat while the
    test body runs (armed). The loop also pauses between fixtures, when it is
    not running at all; the first tick after arming is dropped for that.
    A sampler thread notes where the loop's thread is while a tick is late,
    so a stall names the code that held the loop."""

    SAMPLE_EVERY_S = 0.05

    def __init__(self) -> None:
        self.worst_stall_s = 0.0
        # The loop thread's stack seen most often while a tick was late.
        self.stall_stacks: dict[str, int] = {}
        self._armed = False
        self._skip_next = False
        self._last_tick_s = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._sampler: threading.Thread | None = None
        self._stopped = threading.Event()

    def arm(self, armed: bool) -> None:
        self._armed = armed
        self._skip_next = armed
        self._last_tick_s = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="loop-watch")
        self._sampler = threading.Thread(target=self._sample, args=(threading.get_ident(),),
                                         name="loop-watch-sampler", daemon=True)
        self._sampler.start()

    def culprit(self) -> str:
        if not self.stall_stacks:
            return ""
        stack, _ = max(self.stall_stacks.items(), key=lambda item: item[1])
        return "\nwhere the loop's thread was while it stalled:\n" + stack

    async def _beat(self) -> None:
        interval_s = 0.01
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval_s)
            self._last_tick_s = time.monotonic()
            if self._skip_next:
                self._skip_next = False
            elif self._armed:
                self.worst_stall_s = max(self.worst_stall_s, time.monotonic() - before - interval_s)

    def _sample(self, loop_thread: int) -> None:
        while not self._stopped.wait(self.SAMPLE_EVERY_S):
            if not self._armed or time.monotonic() - self._last_tick_s < MAX_LOOP_STALL_S / 2:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is not None:
                lines = [line for line in traceback.format_stack(frame)
                         if not line.lstrip().startswith('File "<frozen')]
                stack = "".join(lines[-12:])
                self.stall_stacks[stack] = self.stall_stacks.get(stack, 0) + 1

    async def stop(self) -> None:
        assert self._task is not None and self._sampler is not None
        self._stopped.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._sampler.join)


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


def _ours(task: asyncio.Task[object]) -> bool:
    """Tasks started by project or test code. Library tasks (a server's
    keep-alive connections, a NATS client's inbox) live as long as their
    owner, which the session-end check covers."""
    code = getattr(task.get_coro(), "cr_code", None)
    if code is None:
        return False
    return code.co_filename.startswith(str(PROJECT_DIR)) and "site-packages" not in code.co_filename


async def _pending_tasks(before: set[asyncio.Task[object]], only_ours: bool,
                         grace_s: float) -> set[asyncio.Task[object]]:
    deadline = time.monotonic() + grace_s
    while True:
        pending = {t for t in asyncio.all_tasks() - before
                   if not t.done() and t is not asyncio.current_task()
                   and (_ours(t) or not only_ours)}
        if not pending or time.monotonic() > deadline:
            return pending
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture(scope="session", autouse=True)
async def no_tasks_at_session_end() -> AsyncIterator[None]:
    """Torn down last: every session service must have stopped its tasks,
    and every child process must have been stopped."""
    yield
    children = running_children()
    for child in children:
        await child.stop(timeout_s=5.0)
    assert not children, "child processes left running: " + ", ".join(
        f"{child.name} (pid {child.pid}, log {child.log_path})" for child in children)
    left = await _pending_tasks(set(), only_ours=False, grace_s=5.0)
    assert not left, f"tasks still running at session end: {left}"


@pytest_asyncio.fixture(autouse=True)
async def loop_guard(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fails a test that blocks the loop, or that leaves its tasks running."""
    before = set(asyncio.all_tasks())
    watch = _LoopWatch()
    watch.start()
    request.node.stash[_WATCH] = watch
    yield
    await watch.stop()
    leaked = await _pending_tasks(before, only_ours=True, grace_s=2.0)
    assert not leaked, f"test leaked tasks: {leaked}"
    if "allow_loop_stall" not in request.keywords:
        limit_s = MAX_LOOP_STALL_WITH_VLLM_S if "vllm" in request.keywords else MAX_LOOP_STALL_S
        assert watch.worst_stall_s < limit_s, (
            f"event loop blocked for {watch.worst_stall_s:.3f} s{watch.culprit()}")

@pytest_asyncio.fixture(scope="session")
async def switchyard(session_dir: Path, nats_url: str, redis_url: str,
                     ray_cluster: None) -> AsyncIterator[Switchyard]:
    """The whole stack in this process (Ray actors in their own)."""
    yard = await start_switchyard(make_config(session_dir, nats_url, redis_url))
    yield yard
    await yard.aclose()
