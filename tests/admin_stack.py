"""An admin API server for tests: the real app on a free port over the real
redis-server (its own database, flushed first) and a module's nats-server,
with two tenants and a key of every kind the authorization matrix needs."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from actors.control_plane import ControlPlane
from actors.control_store import connect_redis
from deploy.procs import LOOPBACK, free_port
from router.admin_app import create_admin_app
from scheduler.config import AdminConfig, AuthConfig, Config, NatsConfig, RedisConfig
from scheduler.control import SYSTEM, Role

# The Redis database of the admin tests (each module flushes it first); 12-15
# belong to the control plane's and the quota actors' tests.
ADMIN_REDIS_DB = 11


@dataclass
class AdminStack:
    cfg: Config
    plane: ControlPlane
    tenant_a: str
    tenant_b: str
    # identity name -> plaintext key
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.cfg.admin.port}"

    async def new_key(self, tenant_id: str, role: Role = "user", expires_at_s: int = 0) -> str:
        """A key issued by the system (audited like any other); its id."""
        issued = await self.plane.create_key(SYSTEM, _request_id(), tenant_id, role=role,
                                             expires_at_s=expires_at_s)
        return issued.record.key_id


def _request_id() -> str:
    return "test-" + secrets.token_hex(6)


def admin_config(work: Path, nats_url: str, redis_url: str,
                 redis_db: int = ADMIN_REDIS_DB) -> Config:
    return Config(
        var_dir=str(work), admin=AdminConfig(port=free_port()), nats=NatsConfig(url=nats_url),
        redis=RedisConfig(url=redis_url.removesuffix("/0") + f"/{redis_db}"),
        auth=AuthConfig(key_secret="admin-test-secret-" + "0" * 32))


async def _identities(plane: ControlPlane) -> tuple[str, str, dict[str, str]]:
    a = await plane.create_tenant(SYSTEM, _request_id(), "tenant-a")
    b = await plane.create_tenant(SYSTEM, _request_id(), "tenant-b")

    async def key(tenant_id: str, role: Role, expires_at_s: int = 0) -> str:
        issued = await plane.create_key(SYSTEM, _request_id(), tenant_id, role=role,
                                        expires_at_s=expires_at_s)
        return issued.plaintext

    platform = (await plane.bootstrap_platform_key(_request_id())).plaintext
    revoked = await plane.bootstrap_platform_key(_request_id(), name="revoked")
    await plane.revoke_key(SYSTEM, _request_id(), revoked.record.key_id)
    keys = {
        "a_user": await key(a.tenant_id, "user"),
        "a_viewer": await key(a.tenant_id, "viewer"),
        "a_admin": await key(a.tenant_id, "tenant_admin"),
        "b_admin": await key(b.tenant_id, "tenant_admin"),
        "platform": platform,
        "revoked": revoked.plaintext,
        "expired": await key("platform", "platform_admin", expires_at_s=int(time.time()) - 1),
    }
    return a.tenant_id, b.tenant_id, keys


@contextlib.asynccontextmanager
async def running_admin(work: Path, nats_url: str, redis_url: str,
                        redis_db: int = ADMIN_REDIS_DB) -> AsyncIterator[AdminStack]:
    cfg = admin_config(work, nats_url, redis_url, redis_db)
    async with connect_redis(cfg.redis) as redis:
        await redis.flushdb()
        plane = ControlPlane(redis, cfg.auth, None)
        runner = web.AppRunner(create_admin_app(cfg), handler_cancellation=True, access_log=None)
        try:
            tenant_a, tenant_b, keys = await _identities(plane)
            await runner.setup()
            await web.TCPSite(runner, LOOPBACK, cfg.admin.port).start()
            yield AdminStack(cfg, plane, tenant_a, tenant_b, keys)
        finally:
            await runner.cleanup()
