"""The guard that fails tests which block the event loop does see a block."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import MAX_LOOP_STALL_S, _LoopWatch


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
