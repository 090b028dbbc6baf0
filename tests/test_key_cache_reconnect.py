"""An ingress's key cache is dropped when its NATS connection comes back:
a ControlChanged broadcast sent while NATS was down never arrives, so a key
revoked during the outage must not keep working from the cache (real
nats-server, restarted on its port; real Redis, db 29)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from actors.bus import connect_bus
from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import connect_redis
from deploy.procs import start_nats
from router.auth import Authenticator
from scheduler.config import AuthConfig, NatsConfig, RedisConfig
from scheduler.control import SYSTEM
from scheduler.errors import AuthenticationFailed
from scheduler.wire import CONTROL_CHANGED_SUBJECT
from tests.harness import wait_until

pytestmark = pytest.mark.integration
REDIS_DB = 29
SECRET = b"reconnect-secret-" + b"0" * 32
# Far longer than the test: only the reconnect can drop a cached key.
CACHE_TTL_S = 600.0


async def _accepted(auth: Authenticator, key: str) -> bool:
    try:
        await auth.authenticate(f"Bearer {key}")
    except AuthenticationFailed:
        return False
    return True


async def test_a_key_revoked_while_nats_was_down_stops_working_on_reconnect(
        tmp_path: Path, redis_url: str) -> None:
    nats_proc, nats_url = await start_nats(tmp_path / "nats", tmp_path / "logs")
    async with contextlib.AsyncExitStack() as cleanup:
        # Reads nats_proc when it runs: the server below is a restarted one.
        cleanup.push_async_callback(lambda: nats_proc.stop())
        redis = await cleanup.enter_async_context(connect_redis(
            RedisConfig(url=redis_url.removesuffix("/0") + f"/{REDIS_DB}")))
        cleanup.push_async_callback(redis.flushdb)
        await redis.flushdb()
        auth_cfg = AuthConfig(key_secret=SECRET.decode())
        # The ingress reads the plane without publishing; the revocation below is
        # made with no broadcast at all, as one lost in an outage would be.
        plane = ControlPlane(redis, auth_cfg, None)
        cached = Authenticator(plane, SECRET, CACHE_TTL_S)
        # The control: the same cache without the reconnect callback.
        control = Authenticator(plane, SECRET, CACHE_TTL_S)
        bus = NatsConfig(url=nats_url)
        nc = await connect_bus(bus, "reconnect-test", reconnected=cached.on_reconnected)
        cleanup.push_async_callback(nc.close)
        nc_control = await connect_bus(bus, "reconnect-control")
        cleanup.push_async_callback(nc_control.close)
        for conn, auth in ((nc, cached), (nc_control, control)):
            await conn.subscribe(CONTROL_CHANGED_SUBJECT, cb=auth.on_control_changed)
        _, key = await tenant_with_key(plane, "reconnect")
        assert await _accepted(cached, key.plaintext) and await _accepted(control, key.plaintext)

        port = int(nats_url.rsplit(":", 1)[1])
        await nats_proc.stop()
        await plane.revoke_key(SYSTEM, "rc-revoke", key.record.key_id)
        assert await _accepted(cached, key.plaintext)  # from the cache, NATS still down
        nats_proc, _ = await start_nats(tmp_path / "nats", tmp_path / "logs", port=port)

        await wait_until(lambda: _refused(cached, key.plaintext), timeout_s=15)
        await wait_until(lambda: _connected(nc_control), timeout_s=15)
        assert await _accepted(control, key.plaintext)


async def _refused(auth: Authenticator, key: str) -> bool:
    return not await _accepted(auth, key)


async def _connected(nc: NATS) -> bool:
    return nc.is_connected
