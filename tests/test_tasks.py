"""A service's tasks end on aclose even when one swallows a cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from actors.tasks import cancel_and_wait


async def _swallows_one_cancellation(ended: list[bool]) -> None:
    # What Python 3.11's wait_for can do when a cancellation meets a result.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    try:
        await asyncio.sleep(3600)
    finally:
        ended.append(True)


async def test_a_task_that_swallowed_a_cancellation_is_cancelled_again() -> None:
    ended: list[bool] = []
    stubborn = asyncio.create_task(_swallows_one_cancellation(ended))
    plain = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([stubborn, plain]), timeout=5)
    assert ended == [True] and stubborn.cancelled() and plain.cancelled()
