"""The ingress as N worker processes on one port (SO_REUSEPORT: the kernel
spreads new connections over them), each with its own uvloop loop, NATS and
Redis connections, quota leases and placer. This supervisor starts them,
restarts one that dies (up to RESTART_LIMIT times in RESTART_WINDOW_S, then
it stops them all and exits non-zero, which stops `switchyard up`), and on
SIGTERM/SIGINT stops them gracefully.

Their Prometheus metrics live in a shared directory (prometheus_client's
multiprocess mode), so any worker's /metrics answers for all of them: it is
cleared when the supervisor starts, and a dead worker's live gauges are
dropped (its counters stay counted)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("switchyard.workers")

RESTART_DELAY_S = 0.5
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
# A worker drains its outbox (up to 5 s) and closes its connections on SIGTERM.
STOP_TIMEOUT_S = 15.0
# The CPUs `workers = 0` spreads over at most: on a machine this size the
# rest of the local stack (NATS, scheduler actor, replicas) needs the others.
AUTO_WORKERS_MAX = 2


def resolve_workers(configured: int, cpu_count: int | None) -> int:
    """`ingress.workers`, or for 0 one per core up to AUTO_WORKERS_MAX."""
    if configured > 0:
        return configured
    return max(1, min(cpu_count or 1, AUTO_WORKERS_MAX))


def reset_metrics_dir(path: Path) -> None:
    """Empty: counters of an earlier run must not be summed into this one's."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


class WorkerPool:
    """Keeps `workers` processes running, each started as `argv_of(index)`."""

    def __init__(self, argv_of: Callable[[int], Sequence[str]], workers: int,
                 metrics_dir: Path) -> None:
        self._argv_of = argv_of
        self._workers = workers
        self._metrics_dir = metrics_dir
        self.pids: dict[int, int] = {}

    async def run(self, stop: asyncio.Event) -> int:
        """Until `stop` is set (0) or a worker keeps dying (1)."""
        slots = [asyncio.create_task(self._keep(i, stop), name=f"ingress-worker-{i}")
                 for i in range(self._workers)]
        stopping = asyncio.create_task(stop.wait(), name="ingress-workers-stop")
        await asyncio.wait([stopping, *slots], return_when=asyncio.FIRST_COMPLETED)
        gave_up = not stop.is_set()
        for task in [stopping, *slots]:
            task.cancel()
        await asyncio.gather(stopping, *slots, return_exceptions=True)
        return 1 if gave_up else 0

    async def _keep(self, index: int, stop: asyncio.Event) -> None:
        """Runs worker `index`, again after each exit; returns when it gave up."""
        exits: collections.deque[float] = collections.deque()
        while True:
            proc = await asyncio.create_subprocess_exec(*self._argv_of(index),
                                                        stdin=asyncio.subprocess.DEVNULL)
            self.pids[index] = proc.pid
            try:
                status = await proc.wait()
            except asyncio.CancelledError:
                await _stop(proc)
                raise
            self._forget(proc.pid)
            if stop.is_set():  # a signal to the whole group (Ctrl-C) reached it first
                return
            now_s = time.monotonic()
            exits.append(now_s)
            while exits and exits[0] < now_s - RESTART_WINDOW_S:
                exits.popleft()
            if len(exits) > RESTART_LIMIT:
                log.error("ingress worker %d exited %d times in %.0f s; stopping the ingress",
                          index, len(exits), RESTART_WINDOW_S)
                return
            log.warning("ingress worker %d (pid %d) exited with status %s; restarting",
                        index, proc.pid, status)
            await asyncio.sleep(RESTART_DELAY_S)

    def _forget(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self._metrics_dir))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def supervise(argv_of: Callable[[int], Sequence[str]], workers: int,
                    metrics_dir: Path) -> int:
    """Runs the pool until SIGTERM or SIGINT; the exit status."""
    reset_metrics_dir(metrics_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("ingress: %d workers (supervisor pid %d)", workers, os.getpid())
    return await WorkerPool(argv_of, workers, metrics_dir).run(stop)


def die_with_parent(supervisor_pid: int) -> None:
    """A worker ends when its supervisor does, even if that one was killed
    (Linux: PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
