"""Where an ingress worker's CPU goes, per stage of a request: py-spy samples
of the running process (raw collapsed stacks, idle threads excluded), each
sample holding the GIL (so a thread waiting, or the loop in epoll, is not
counted) put in a stage: metrics or logging wherever they are called from;
else the stage of the outermost switchyard function on its stack (or, for
switchyard's own tasks and callbacks, of their file; for loop callbacks
outside them, of the library the sample is in), and scaled by the process's
CPU time per request (/proc).

    python -m loadtests.stage_profile RAW [--cpu-us-per-request N]

splits a saved py-spy raw file again (bench_overhead `--json PATH --profile`
saves it beside PATH)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from pathlib import Path

# Cross-cutting work, wherever it is called from: any frame in these files.
CROSS_CUTTING = (
    ("prometheus_client/", "metrics"),
    ("logging/", "logging"),
)
# (function, file) -> stage; the outermost match on a stack wins.
STAGES = {
    ("authenticate", "router/auth.py"): "auth",
    ("parse_request", "router/requests.py"): "validation",
    ("require", "router/prices.py"): "quota",
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
# Tasks and callbacks of switchyard's own outside any handler: the outermost
# frame in one of these files.
OWNERS = (
    ("router/outbox.py", "usage + done publish"),
    ("router/placer.py", "placement"),
    ("router/quota", "quota"),
)
# Loop callbacks of libraries outside any switchyard frame: the innermost match.
LIBRARIES = (
    ("nats/", "nats client"),
    ("aiohttp/client", "upstream io"),
    ("aiohttp/connector", "upstream io"),
    ("aiohttp/web", "http server"),
    ("aiohttp/http", "http server"),
    ("aiohttp/", "http server"),
)


def classify(stack: str) -> str:
    frames = stack.split(";")
    for file, stage in CROSS_CUTTING:
        if any(file in frame for frame in frames):
            return stage
    for frame in frames:
        name, _, where = frame.partition(" (")
        # py-spy names a method `Class.method`.
        name = name.rpartition(".")[2]
        for (function, file), stage in STAGES.items():
            if name == function and file in where:
                return stage
    for frame in frames:
        for file, stage in OWNERS:
            if file in frame:
                return stage
    if frames[-1].startswith("run_app "):
        # No Python frame below the loop: uvloop's own work (socket I/O,
        # polling, timers), for every connection of the process.
        return "event loop (I/O)"
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


def main() -> int:
    parser = argparse.ArgumentParser(description="Split a py-spy raw file by stage.")
    parser.add_argument("raw", type=Path)
    parser.add_argument("--cpu-us-per-request", type=float, default=1e6,
                        help="scale the shares to this (default: parts per million)")
    args = parser.parse_args()
    raw = args.raw.read_text()
    for stage, share in breakdown(raw).items():
        print(f"{stage:<24}{share * args.cpu_us_per_request:>10.1f}")
    for frame, share in top_functions(raw, 30).items():
        print(f"{share:>7.2%}  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
