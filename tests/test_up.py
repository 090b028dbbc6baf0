"""`switchyard up` as a user runs it: starts every part, serves a streamed
request, and leaves no process behind after SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from nats.aio.msg import Msg

from deploy.procs import LOOPBACK, free_port, free_port_block
from scheduler.wire import KV_SUBJECT, LOAD_SUBJECT, KvEventsRelay, kv_decoder, load_decoder
from tests.harness import MODEL, nats_client, wait_until

pytestmark = pytest.mark.integration

UP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray's, the children's), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _leftovers(up_pid: int, workdir: Path) -> dict[int, str]:
    """Live processes that belong to an `up` run (pid -> command line), found
    by what their command lines name: its working directory, or its Ray
    session (named after the driver's pid). Orphans are found too, unlike by
    walking the tree."""
    ray_session = re.compile(rf"session_[0-9_-]+_{up_pid}\b")
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        if (str(workdir) in args or ray_session.search(args)) and _alive(pid):
            found[pid] = args[:120]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _config(tmp_path: Path, nats_port: int = 0, metrics_port: int = 0) -> Path:
    path = tmp_path / "switchyard.toml"
    path.write_text(f"""
[ingress]
port = {free_port()}
[admin]
port = {free_port()}
[nats]
url = "nats://127.0.0.1:{nats_port or free_port()}"
[redis]
url = "redis://127.0.0.1:{free_port()}/0"
[simulator]
base_port = {free_port_block(2)}
replicas = 2
decode_ms_per_token = 2.0
[scheduler]
actors = 2
metrics_port = {metrics_port or free_port_block(2)}
""")
    return path


class UpRun:
    """`switchyard up` in its own process group (as in a terminal), its
    output on a pipe the test owns and can close, as a dying `tee` would."""

    def __init__(self, proc: asyncio.subprocess.Process, output: asyncio.StreamReader,
                 transport: asyncio.ReadTransport, workdir: Path) -> None:
        self.proc = proc
        self.output = output
        self._transport = transport
        self.workdir = workdir

    @classmethod
    async def start(cls, workdir: Path, config: Path) -> UpRun:
        read_fd, write_fd = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deploy.cli", "up", "--config", str(config), cwd=workdir,
            stdout=write_fd, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        os.close(write_fd)
        output = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(output), os.fdopen(read_fd, "rb", 0))
        return cls(proc, output, transport, workdir)

    async def until_up(self) -> str:
        seen = []
        while line := (await self.output.readline()).decode():
            seen.append(line)
            if line.startswith("switchyard is up"):
                return line
        raise AssertionError("switchyard up exited before it was up:\n" + "".join(seen))

    def ctrl_c(self) -> None:
        """What a terminal does: SIGINT to the whole group; the reader dies too."""
        self.close_output()
        os.killpg(self.proc.pid, signal.SIGINT)

    def close_output(self) -> None:
        self._transport.close()

    async def aclose(self) -> None:
        """After a failed test too: stops `up` as an operator would, then ends
        by PID whatever of its run is left, so no test leaves servers behind."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.close_output()
        for pid in _leftovers(self.proc.pid, self.workdir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_up_names_the_part_that_failed(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        run = await UpRun.start(tmp_path, _config(tmp_path, nats_port=taken.getsockname()[1]))
        try:
            out = await asyncio.wait_for(run.output.read(), UP_TIMEOUT_S)
            assert await asyncio.wait_for(run.proc.wait(), STOP_TIMEOUT_S) == 1
        finally:
            await run.aclose()
    assert "nats-server failed to start" in out.decode()
    assert not _leftovers(run.proc.pid, tmp_path)


class AgentWatch:
    """Listens to what the replica agents publish: load snapshots and
    relayed KV-cache events."""

    def __init__(self) -> None:
        self.healthy: set[str] = set()
        self.kv_batches = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def watching(cls, nats_url: str) -> AsyncIterator[AgentWatch]:
        async with nats_client(nats_url) as nc:
            watch = cls()
            await nc.subscribe(LOAD_SUBJECT.format(model="*"), cb=watch._on_load)
            await nc.subscribe(KV_SUBJECT.format(model="*", replica="*"), cb=watch._on_kv)
            await nc.flush()
            yield watch

    async def _on_load(self, msg: Msg) -> None:
        snapshot = load_decoder.decode(msg.data)
        if snapshot.healthy and snapshot.cache is not None and not snapshot.precise_error:
            self.healthy.add(snapshot.replica_id)

    async def _on_kv(self, msg: Msg) -> None:
        if isinstance(kv_decoder.decode(msg.data), KvEventsRelay):
            self.kv_batches += 1

    async def until(self, replicas: int, timeout_s: float) -> None:
        async def seen() -> bool:
            return len(self.healthy) >= replicas and self.kv_batches > 0

        await wait_until(seen, timeout_s)


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
async def test_up_serves_a_stream_and_stops_cleanly(tmp_path: Path, stop: str) -> None:
    nats_port, metrics_port = free_port(), free_port_block(2)
    run = await UpRun.start(tmp_path, _config(tmp_path, nats_port, metrics_port))
    proc = run.proc
    try:
        line = await asyncio.wait_for(run.until_up(), UP_TIMEOUT_S)
        api = re.search(r"API (\S+)", line).group(1)
        key = re.search(r"demo key (\S+)", line).group(1)
        assert api.startswith("http://127.0.0.1:")
        admin = re.search(r"admin (\S+)", line).group(1)
        async with aiohttp.ClientSession() as session, \
                session.get(f"{admin}/openapi.json") as resp:
            assert resp.status == 200 and (await resp.json())["openapi"] == "3.1.0"
        children = _descendants(proc.pid)
        assert len(children) >= 4  # nats, redis, simulator, ingress, Ray's
        assert len(_leftovers(proc.pid, tmp_path)) >= 4  # the check can see them
        async with AgentWatch.watching(f"nats://{LOOPBACK}:{nats_port}") as watch:
            # Long enough to fill KV blocks: the replica announces them.
            body = {"model": MODEL, "stream": True, "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi there, " * 40}]}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{api}/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == 200
                    text = (await resp.read()).decode()
            assert text.rstrip().endswith("data: [DONE]") and text.count("data: ") >= 6
            await watch.until(replicas=2, timeout_s=20)
        async with aiohttp.ClientSession() as session:
            # The first scheduler actor's own metrics: the placement it made.
            async with session.get(f"http://{LOOPBACK}:{metrics_port}/metrics") as resp:
                assert resp.status == 200
                assert re.search(r'switchyard_scheduler_events_total\{actor="switchyard-'
                                 r'scheduler-0",kind="(placed|peer_placed)"\} 1\.0',
                                 await resp.text())
        if stop == "ctrl-c":
            run.ctrl_c()
        else:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S) == 0
        left = {pid for pid in children if _alive(pid)}
        assert not left, f"processes left behind: {left}"
        assert not _leftovers(proc.pid, tmp_path)
    finally:
        await run.aclose()
