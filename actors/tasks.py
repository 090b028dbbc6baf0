"""Stopping the tasks a service owns."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

# How long a cancelled task gets before it is cancelled again.
RECANCEL_AFTER_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancels `tasks` and waits until every one has ended. A task is
    cancelled again while it runs on: Python 3.11's asyncio.wait_for (inside
    nats-py's fetch, say) drops a cancellation that arrives just as what it
    waits for completes, and a consumer loop then fetches on forever. The
    tasks' own CancelledErrors stay in them; a cancellation of the caller
    still propagates."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER_S)
