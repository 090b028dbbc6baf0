"""The key cache's store reads (router/auth.py): concurrent requests for a
key not cached share one read; a request after an eviction does not join a
read that started before it (it could return the copy the change replaced)."""

from __future__ import annotations

import asyncio

import pytest

from router.auth import Authenticator, Credentials
from scheduler import apikeys
from scheduler.errors import AuthenticationFailed
from scheduler.wire import ControlChanged

SECRET = b"reads-secret-" + b"0" * 32


class GatedPlane:
    """Answers "no such key" once `opened`; counts the reads."""

    def __init__(self) -> None:
        self.reads = 0
        self.opened = asyncio.Event()

    async def credentials(self, key_id: str) -> Credentials | None:
        self.reads += 1
        await self.opened.wait()
        return None


async def _refused(auth: Authenticator, key: str) -> None:
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(f"Bearer {key}")


@pytest.mark.parametrize(("evict_between", "reads"), [(False, 1), (True, 2)])
async def test_concurrent_misses_share_one_read(evict_between: bool, reads: int) -> None:
    plane = GatedPlane()
    auth = Authenticator(plane, SECRET, cache_ttl_s=60.0)  # type: ignore[arg-type]
    key = apikeys.issue(SECRET)
    first = [asyncio.ensure_future(_refused(auth, key.plaintext)) for _ in range(5)]
    await asyncio.sleep(0)
    if evict_between:
        auth.evict(ControlChanged(kind="key", id=key.key_id))
    later = [asyncio.ensure_future(_refused(auth, key.plaintext)) for _ in range(5)]
    await asyncio.sleep(0)
    plane.opened.set()
    await asyncio.gather(*first, *later)
    assert plane.reads == reads
    # Cached now (the read after the eviction was): no read more.
    await _refused(auth, key.plaintext)
    assert plane.reads == reads
