"""Where an ingress worker's CPU goes, per stage of a request: py-spy samples
of the running process (raw collapsed stacks, idle threads excluded), each
sample holding the GIL (so a thread waiting, or the loop in epoll, is not
counted) put in the stage of the outermost switchyard function on its stack
(or, for loop callbacks outside any handler, of the library it is in), and
scaled by the process's CPU time per request (/proc)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path

# (function, file) -> stage; the outermost match on a stack wins.
STAGES = {
    ("authenticate", "router/auth.py"): "auth",
    ("parse_request", "router/requests.py"): "validation",
    ("admit", "router/quota_client.py"): "quota",
    ("settle", "router/quota_client.py"): "quota",
    ("release", "router/quota_client.py"): "quota",
    ("_place_request", "router/gateway.py"): "placement",
    ("_place", "router/gateway.py"): "placement",
    ("open", "router/upstream.py"): "upstream send",
    ("read_body", "router/upstream.py"): "upstream read",
    ("first_event", "router/upstream.py"): "upstream read",
    ("_relay_body", "router/http_api.py"): "relay to client",
    ("_relay_stream", "router/http_api.py"): "relay to client",
    ("finish", "router/gateway.py"): "usage + done publish",
}
# Frames of loop callbacks outside any handler, by file.
LIBRARIES = (
    ("router/outbox.py", "usage + done publish"),
    ("router/placer.py", "placement"),
    ("router/quota", "quota"),
    ("nats/", "nats client"),
    ("aiohttp/client", "upstream io"),
    ("aiohttp/connector", "upstream io"),
    ("aiohttp/web", "http server"),
    ("aiohttp/http", "http server"),
    ("aiohttp/", "http server"),
    ("prometheus_client/", "metrics"),
)


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in frames:
        name, _, where = frame.partition(" (")
        for (function, file), stage in STAGES.items():
            if name == function and file in where:
                return stage
    for frame in reversed(frames):
        for file, stage in LIBRARIES:
            if file in frame:
                return stage
    return "other (loop, gc)"


def breakdown(raw: str) -> dict[str, float]:
    """Share of samples per stage, from py-spy's raw output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[classify(stack)] += int(count)
    total = sum(counts.values()) or 1
    return {stage: n / total for stage, n in counts.most_common()}


def top_functions(raw: str, count: int = 15) -> dict[str, float]:
    """Share of samples per innermost frame (where the time is spent itself)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack and samples.isdigit():
            counts[stack.rsplit(";", 1)[-1]] += int(samples)
    total = sum(counts.values()) or 1
    return {frame: round(n / total, 4) for frame, n in counts.most_common(count)}


def ingress_pids(workdir: Path) -> list[int]:
    """The ingress workers of the `up` run in `workdir` (their command lines name its config)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"router" in args and b"--worker" in args and str(workdir).encode() in b" ".join(args):
            pids.append(int(cmdline.parent.name))
    if not pids:  # a single-process ingress (no --worker flag)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"router" in args and str(workdir).encode() in b" ".join(args):
                pids.append(int(cmdline.parent.name))
    return sorted(pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def record(pid: int, seconds: float, out: Path) -> str:
    """py-spy's raw samples of `pid` over `seconds` ('' if py-spy failed)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    proc = await asyncio.create_subprocess_exec(
        str(py_spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", "200", "--gil", "--format", "raw", "--nolineno", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await proc.wait()
    return out.read_text() if out.exists() else ""
