"""Child processes: one that never gets ready is not left running."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.procs import ChildProcess, StartFailed, running_children


async def _never() -> bool:
    return False


async def test_a_child_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    child = ChildProcess("sleeper", ["sleep", "30"], tmp_path / "sleeper.log")
    await child.start()
    assert child in running_children()
    with pytest.raises(StartFailed, match="not ready"):
        await child.wait_ready(_never, timeout_s=0.3)
    assert child.exited() and child not in running_children()
