"""Memory and CPU of the processes of a run, from /proc: the ingress
process(es), simulators, admin API and locust, found by command line below
the driver (`switchyard up` and locust are its children), sampled
into a CSV (one row per process and sample), and their RSS drift."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# command-line markers -> role (first match wins; the admin API runs router.admin_main).
ROLES = (("router.admin_main", "admin"), ("-m router", "ingress"),
         ("loadtests.simulator", "simulator"), ("-m locust", "locust"))


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            parents[int(stat.parent.name)] = int(_stat_fields(int(stat.parent.name))[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def role_of(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
    return next((role for marker, role in ROLES if marker in args), "")


@dataclass(frozen=True)
class Sample:
    t_s: float
    pid: int
    role: str
    rss_kib: int
    cpu_s: float


def sample(pid: int, role: str, t_s: float) -> Sample | None:
    try:
        fields = _stat_fields(pid)
    except OSError:
        return None
    # Fields after the command: state is 0, utime 11, stime 12, rss (pages) 21.
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return Sample(t_s, pid, role, int(fields[21]) * PAGE_KIB, cpu_s)


class ProcessSampler:
    """Every `interval_s`, one row per process of `roots`' trees that has a
    role; start() / aclose() own the sampling task."""

    def __init__(self, roots: list[int], csv_path: Path, interval_s: float = 10.0) -> None:
        self.roots = roots
        self.csv_path = csv_path
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None
        self._started_s = time.monotonic()

    def start(self) -> None:
        self._started_s = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="process-sampler")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample_once()  # the state at the end
        self._write()

    async def _run(self) -> None:
        while True:
            self.sample_once()
            await asyncio.sleep(self.interval_s)

    def sample_once(self) -> None:
        t_s = round(time.monotonic() - self._started_s, 1)
        pids = set(self.roots).union(*(descendants(root) for root in self.roots))
        for pid in sorted(pids):
            role = role_of(pid)
            if role and (row := sample(pid, role, t_s)) is not None:
                self.samples.append(row)

    def _write(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["t_s", "pid", "role", "rss_kib", "cpu_s"])
            for s in self.samples:
                out.writerow([s.t_s, s.pid, s.role, s.rss_kib, round(s.cpu_s, 2)])


def role_totals(samples: list[Sample], role: str) -> list[tuple[float, int, float]]:
    """(t_s, summed RSS KiB, summed CPU s) of a role's processes, per sample time."""
    by_t: dict[float, tuple[int, float]] = {}
    for s in samples:
        if s.role == role:
            rss, cpu = by_t.get(s.t_s, (0, 0.0))
            by_t[s.t_s] = (rss + s.rss_kib, cpu + s.cpu_s)
    return [(t, rss, cpu) for t, (rss, cpu) in sorted(by_t.items())]


def rss_drift(totals: list[tuple[float, int, float]], warmup_s: float) -> dict[str, float]:
    """RSS at the start (median of the first three samples after `warmup_s`)
    and at the end (median of the last three), and the drift between them."""
    after = [rss for t, rss, _ in totals if t >= warmup_s]
    if len(after) < 2:
        return {}
    start = statistics.median(after[:3])
    end = statistics.median(after[-3:])
    return {"rss_start_mib": round(start / 1024, 1), "rss_end_mib": round(end / 1024, 1),
            "rss_drift_pct": round(100 * (end - start) / start, 2)}


def cpu_share(samples: list[Sample]) -> dict[str, float]:
    """CPU seconds each role used between the first and the last sample."""
    used: dict[str, float] = {}
    for role in {s.role for s in samples}:
        totals = role_totals(samples, role)
        if len(totals) >= 2:
            used[role] = round(totals[-1][2] - totals[0][2], 1)
    return used
