"""StoreProcess: the usage store (chDB or a ClickHouse client) in a child
process of its own, driven over a pipe.

Why not a thread: a chDB insert, and clickhouse-connect's serialization
before it, need the GIL in many short stretches; next to a loop busy with
tens of thousands of NATS messages a second, both starved each other (a
20,000-row insert took 2-5x longer, and the loop stalled for up to a second).
In its own process the store has its own GIL, the loop keeps turning, and
chDB is still one engine in one process.

`call(fn, *args)` runs `fn(store, *args)` in the child, one call at a time,
and returns its result or raises its exception. `fn` travels by reference
(pickle), so it must be a module-level function. The child dies with its
parent (PR_SET_PDEATHSIG), so a SIGKILLed service never leaves the chDB path
locked; a child that died is started again by the next call.

    python -m analytics.store_process CLICKHOUSE_CONFIG_JSON VAR_DIR   (the child)
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from analytics.store import UsageStore, open_store
from scheduler.config import ClickHouseConfig

T = TypeVar("T")

_FRAME = struct.Struct("!Q")
OPEN_RETRY_S = 10.0
# Linux prctl option: signal this process when its parent dies.
_PR_SET_PDEATHSIG = 1


class StoreProcessDied(ConnectionError):
    """The store process exited during a call; the call's effect is unknown."""


class StoreProcess:
    def __init__(self, cfg: ClickHouseConfig, var_dir: str,
                 module: str = "analytics.store_process") -> None:
        # `module` is the child's main: a fault-injecting store (loadtests/jepsen) runs its own.
        self._argv = [sys.executable, "-m", module, msgspec.json.encode(cfg).decode(), var_dir]
        # The project's root on the child's path, whatever put it on ours
        # (a Ray worker may have added it to sys.path, not to the environment).
        root = str(Path(__file__).resolve().parent.parent)
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
        self._proc: asyncio.subprocess.Process | None = None
        # One call at a time: the pipe carries one request and its answer.
        self._lock = asyncio.Lock()
        self._closed = False
        self.starts = 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            if self._closed:
                raise StoreProcessDied("the store process was closed")
            proc = await self._running()
            assert proc.stdin is not None and proc.stdout is not None
            request = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                proc.stdin.write(_FRAME.pack(len(request)) + request)
                await proc.stdin.drain()
                size = _FRAME.unpack(await proc.stdout.readexactly(_FRAME.size))[0]
                ok, value = pickle.loads(await proc.stdout.readexactly(size))
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                await self._reap()
                raise StoreProcessDied(f"the store process exited: {exc}") from exc
            except BaseException:
                # Cancelled mid-call: the answer would arrive out of step.
                await self._reap()
                raise
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Closes the child's input; it closes the store and exits."""
        async with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
            if proc is None or proc.returncode is not None:
                return
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def _running(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=self._env)
            self.starts += 1
        return self._proc

    async def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before the line above took effect.
    if os.getppid() == 1:
        raise SystemExit(1)


def serve(cfg: ClickHouseConfig, var_dir: str,
          wrap: Callable[[UsageStore], UsageStore] = lambda store: store) -> None:
    """The child: opens the store (as `wrap` makes it), then answers calls
    until its input closes."""
    # The pipe is fd 1; everything printed goes to stderr (the parent's log).
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    store = wrap(_open(cfg, var_dir))
    try:
        while header := requests.read(_FRAME.size):
            request = requests.read(_FRAME.unpack(header)[0])
            try:
                fn, args = pickle.loads(request)
                answer = pickle.dumps((True, fn(store, *args)), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                answer = _pickled_failure(exc)
            replies.write(_FRAME.pack(len(answer)) + answer)
            replies.flush()
    finally:
        store.close()


def _open(cfg: ClickHouseConfig, var_dir: str) -> UsageStore:
    """Opens the store; a chDB path still locked by a predecessor that is
    being killed (its parent was) is tried again for a while."""
    deadline_s = time.monotonic() + OPEN_RETRY_S
    while True:
        try:
            return open_store(cfg, var_dir)
        except Exception:
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.2)


def _pickled_failure(exc: Exception) -> bytes:
    try:
        return pickle.dumps((False, exc), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle still says what it was
        return pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


def child_main(wrap: Callable[[UsageStore], UsageStore] = lambda store: store) -> None:
    """A store process's main: `sys.argv` as StoreProcess passes it."""
    _die_with_parent()
    serve(msgspec.json.decode(sys.argv[1].encode(), type=ClickHouseConfig), sys.argv[2], wrap)


if __name__ == "__main__":
    child_main()
