"""The routing benchmark: its offline oracle (pure, table-driven) and a smoke
run of its quick form (two policies, workload A) through the real stack. The
smoke run checks that it ran and printed sane numbers, not the targets."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

import pytest

from loadtests.routing_trace import FleetShape, TraceRequest, oracle_hit_rate

BLOCK = 4


def _req(group: str, at_s: float) -> TraceRequest:
    return TraceRequest(at_s=at_s, group=group, messages=(), max_tokens=1)


def _prompt(group_tag: int, blocks: int, tail: int) -> list[int]:
    """`blocks` full blocks shared by the group, then `tail` tokens of its own."""
    return [group_tag] * (blocks * BLOCK) + [1000 + tail] * BLOCK


@pytest.mark.parametrize(("name", "groups", "replicas", "cache_blocks", "expected"), [
    # One group of 3 requests: the 2nd and 3rd hit its 2 shared blocks (8 of 12 tokens).
    ("one group fits", [(1, 2)], 1, 10, (2 * 8) / (3 * 12)),
    # Two groups on two replicas: each pinned to its own, each hits as if alone.
    ("groups spread", [(1, 2), (2, 2)], 2, 10, (4 * 8) / (6 * 12)),
    # Two groups sharing one replica that holds only 3 blocks: they evict each other.
    ("cache too small", [(1, 2), (2, 2)], 1, 4, 0.0),
])
def test_oracle_hit_rate(name: str, groups: list[tuple[int, int]], replicas: int,
                         cache_blocks: int, expected: float) -> None:
    trace, prompts = [], []
    for turn in range(3):
        for tag, blocks in groups:
            trace.append(_req(f"g{tag}", at_s=turn + tag / 10))
            prompts.append(_prompt(tag, blocks, tail=turn * 10 + tag))
    shape = FleetShape(replicas=replicas, cache_blocks=cache_blocks, block_size_tokens=BLOCK)
    assert oracle_hit_rate(trace, prompts, shape) == pytest.approx(expected), name


def test_oracle_never_counts_the_last_token_as_a_hit() -> None:
    # vLLM recomputes at least the last prompt token: an exact repeat of a
    # 2-block prompt hits 1 block, not 2.
    trace = [_req("g", 0.0), _req("g", 1.0)]
    prompts = [[7] * (2 * BLOCK)] * 2
    shape = FleetShape(replicas=1, cache_blocks=10, block_size_tokens=BLOCK)
    assert oracle_hit_rate(trace, prompts, shape) == pytest.approx(BLOCK / (4 * BLOCK))


@pytest.mark.integration
async def test_quick_form_runs_and_prints_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtests.bench_routing", "--quick", "--workloads", "A",
        "--policies", "least-load,prefix-precise", "--json", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=300)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "wl policy" in stdout.decode()  # the table
    result = json.loads(out.read_text())
    for policy in ("least-load", "prefix-precise"):
        m = result["median"]["A"][policy]
        assert m["requests"] > 20 and m["completed"] == m["requests"], m
        assert m["failed"] == 0, m
        assert 0 < m["ttft_p50_s"] <= m["ttft_p90_s"] <= m["ttft_p99_s"] < 30, m
        assert 0 <= m["hit_rate"] <= 1 and 0 < m["oracle_hit_rate"] <= 1, m
        assert m["throughput_rps"] > 0 and 0 <= m["goodput_rps"] <= m["throughput_rps"], m
        assert math.isclose(m["hit_rate"], m["client_cached_fraction"], abs_tol=0.05), m
