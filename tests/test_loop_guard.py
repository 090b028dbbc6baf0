"""The guard that fails tests which block the event loop does see a block;
the whole session runs on one uvloop loop."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import uvloop

from tests.conftest import MAX_LOOP_STALL_S, PROJECT_DIR, _LoopWatch


@pytest.mark.allow_loop_stall
async def test_a_blocking_call_is_measured() -> None:
    watch = _LoopWatch()
    watch.start()
    watch.arm(True)
    await asyncio.sleep(0.05)  # the first tick after arming is dropped
    time.sleep(MAX_LOOP_STALL_S + 0.1)  # what the guard exists to catch
    await asyncio.sleep(0.05)
    await watch.stop()
    assert watch.worst_stall_s > MAX_LOOP_STALL_S
    # The failure names where the loop was held.
    assert "time.sleep(MAX_LOOP_STALL_S + 0.1)" in watch.culprit()



async def test_one_uvloop_loop_for_the_whole_session() -> None:
    """Sync and async tests mixed must share the session's loop: a loop
    torn down mid-run closes under the session's servers (and uvloop's close
    can then hang). pytest's setup plan shows every runner built."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "--setup-plan", "-p", "no:cacheprovider",
        "tests/test_block_hash.py", "tests/test_loop_guard.py", "tests/test_retry_units.py",
        cwd=PROJECT_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    plan = out.decode()
    assert proc.returncode == 0, plan
    runners = [line for line in plan.splitlines()
               if line.startswith("SETUP    S _session_scoped_runner")]
    assert len(runners) == 1, plan
