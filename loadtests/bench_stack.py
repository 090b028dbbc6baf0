"""`switchyard up` on free loopback ports for the benchmarks that measure the
whole stack from outside (bench_overhead, bench_failover)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.procs import free_port, free_port_block

MODEL = "switchyard-tiny"
BODY = {"model": MODEL, "max_tokens": 1,
        "messages": [{"role": "user", "content": "How far is the next station?"}]}


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class BenchStack:
    proc: asyncio.subprocess.Process
    # The ingress's /v1/chat/completions, each simulated replica's, the demo key.
    via_url: str
    direct_urls: list[str]
    key: str
    api_port: int

    @property
    def direct_url(self) -> str:
        return self.direct_urls[0]


async def start_stack(workdir: Path, replicas: int = 1, workers: int = 1,
                      simulator_toml: str = "", admin: bool = True) -> BenchStack:
    """`switchyard up` with `replicas` simulated replicas and `workers` ingress
    processes; `simulator_toml`: more lines of its [simulator] table."""
    api_port, sim_port = free_port(), free_port_block(replicas)
    config = workdir / "bench.toml"
    config.write_text(f"""
[ingress]
port = {api_port}
[admin]
enabled = {"true" if admin else "false"}
port = {free_port()}
[nats]
url = "nats://127.0.0.1:{free_port()}"
[redis]
url = "redis://127.0.0.1:{free_port()}/0"
[scheduler]
metrics_port = 0
[simulator]
base_port = {sim_port}
replicas = {replicas}
{simulator_toml}
""")
    argv = [sys.executable, "-m", "deploy.cli", "up", "--config", str(config),
            "--workers", str(workers)]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ))
    assert proc.stdout is not None
    lines = []
    while line := (await proc.stdout.readline()).decode():
        lines.append(line)
        if line.startswith("switchyard is up"):
            found = re.search(r"demo key (\S+)", line)
            assert found is not None
            direct = [f"http://127.0.0.1:{sim_port + i}/v1/chat/completions"
                      for i in range(replicas)]
            return BenchStack(proc, f"http://127.0.0.1:{api_port}/v1/chat/completions",
                              direct, found.group(1), api_port)
    raise RuntimeError(f"switchyard up failed (exit {await proc.wait()}):\n{''.join(lines)}")


async def stop_stack(stack: BenchStack) -> None:
    stack.proc.terminate()
    await stack.proc.wait()
