"""A private Ray head for tests (`ray start --head --block`), its own ports,
temp dir and auth token, so stopping it never touches another Ray on the
machine: it is stopped by killing its own process tree, as `ray stop
--force` would, but only that."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from deploy.procs import LOOPBACK, ChildProcess, free_port_block
from tests.harness import PROJECT_DIR

# gcs, node manager, object manager, runtime-env agent, metrics, dashboard;
# then the workers' range.
_FIXED_PORTS = 6
_WORKER_PORTS = 40
# What `ray start --block` prints once the node is up and registered.
READY_LINE = "This command will now block forever"
_SS_USER = re.compile(r'\("([^"]*)",pid=(\d+),')


def process_tree(root: int) -> set[int]:
    """`root` and every live descendant (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    tree = {root}
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


async def tcp_listeners(pids: set[int]) -> list[tuple[str, str, int]]:
    """(local address, process name, pid) of every TCP listener of `pids` (`ss -tlnp`)."""
    ss = await asyncio.create_subprocess_exec("ss", "-tlnpH", stdout=asyncio.subprocess.PIPE)
    out, _ = await ss.communicate()
    assert ss.returncode == 0
    found = []
    for line in out.decode().splitlines():
        fields = line.split()
        for name, pid in _SS_USER.findall(line):
            if int(pid) in pids:
                found.append((fields[3], name, int(pid)))
    return found


class PrivateRayHead:
    def __init__(self, logs: Path) -> None:
        # Short: Ray's unix sockets live under it (a path is at most 107 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="sy-ray-", dir="/tmp"))
        self.logs = logs
        self.port = free_port_block(_FIXED_PORTS + _WORKER_PORTS)
        token = self.dir / "auth_token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        self.env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    # Ray's 30 s for a raylet to register is short on a loaded 2-core box.
                    "RAY_raylet_start_wait_time_s": "120"}
        self.proc: ChildProcess | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def start(self) -> None:
        p = self.port
        ray = str(Path(sys.executable).with_name("ray"))
        self.starts += 1
        self.proc = ChildProcess(f"ray head {self.starts}", [
            ray, "start", "--head", "--block", f"--port={p}", f"--node-ip-address={LOOPBACK}",
            f"--temp-dir={self.dir / 'ray'}", "--num-cpus=2", "--disable-usage-stats",
            "--include-dashboard=false", f"--dashboard-host={LOOPBACK}",
            f"--node-manager-port={p + 1}", f"--object-manager-port={p + 2}",
            f"--runtime-env-agent-port={p + 3}", f"--metrics-export-port={p + 4}",
            f"--dashboard-port={p + 5}", f"--min-worker-port={p + _FIXED_PORTS}",
            f"--max-worker-port={p + _FIXED_PORTS + _WORKER_PORTS - 1}",
        ], self.logs / f"ray-head-{self.starts}.log", env=self.env)
        await self.proc.start()
        try:
            await self._until_ready(timeout_s=180)
        except BaseException:
            await self.kill()  # the whole tree: stopping `ray start` alone may orphan it
            raise

    async def _until_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        while READY_LINE not in self.proc.log_path.read_text():
            if self.proc.exited() or loop.time() > deadline_s:
                raise self.proc.failure("not ready")
            await asyncio.sleep(0.1)

    def pids(self) -> set[int]:
        assert self.proc is not None and self.proc.pid is not None
        return process_tree(self.proc.pid)

    async def kill(self) -> None:
        """Every process of this head (GCS, raylet, agents, workers) at once."""
        assert self.proc is not None
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await self.proc.stop()

    async def aclose(self) -> None:
        if self.proc is not None and not self.proc.exited():
            await self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def driver(head: PrivateRayHead, config_path: Path, command: str, log: Path) -> ChildProcess:
    """`python -m deploy.stack_actors --config ... <command>` against `head`."""
    return ChildProcess(f"actors {command}", [
        sys.executable, "-m", "deploy.stack_actors", "--config", str(config_path), command],
        log, env=head.env)


def events(log: Path, kind: str) -> list[dict[str, object]]:
    """The JSON lines of `kind` a driver printed."""
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith('{"event": '):
            event = json.loads(line)
            if event["event"] == kind:
                found.append(event)
    return found


async def wait_event(log: Path, kind: str, count: int = 1,
                     timeout_s: float = 60.0) -> dict[str, object]:
    """The `count`-th event of `kind` in `log`, waiting for it."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    while len(found := events(log, kind)) < count:
        if loop.time() > deadline_s:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise AssertionError(f"no {kind} event #{count} within {timeout_s} s:\n{tail}")
        await asyncio.sleep(0.05)
    return found[count - 1]
