"""The locust suite end to end, short: the real locustfile, headless in its
own process for 10 s, against a small private stack (ingress, scheduler and
quota shard actors, simulated replicas, the admin API that provisions the
tenants), producing the rows a run is judged by."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from aiohttp import web

from actors.control_plane import ControlPlane
from actors.control_store import connect_redis
from deploy.procs import LOOPBACK, free_port
from loadtests.locust.results import EXPECTED_429, STREAMS, TENANT_REQUESTS, problems, read_stats
from loadtests.locust.run import LocustRun
from loadtests.locust.stack import TenantPlan, provision
from router.admin_app import create_admin_app
from scheduler.config import AdminConfig, Config
from scheduler.quota_terms import QuotaConfig
from tests.harness import private_switchyard

pytestmark = pytest.mark.integration

REDIS_DB = 10
LOCUST_S = 10


def _tweak(cfg: Config) -> Config:
    # A loaded test machine can keep the shard from answering within the default.
    return msgspec.structs.replace(cfg, admin=AdminConfig(port=free_port()),
                                   quota=QuotaConfig(shards=1, call_timeout_s=2.0))


@dataclass
class Stack:
    api_url: str
    admin_url: str
    admin_key: str


@pytest_asyncio.fixture(scope="module")
async def stack(session_dir: Path, redis_url: str, ray_cluster: None) -> AsyncIterator[Stack]:
    work = session_dir / "locust-smoke-stack"
    async with private_switchyard(work, redis_url, REDIS_DB, _tweak) as yard:
        async with connect_redis(yard.cfg.redis) as redis:
            admin_key = (await ControlPlane(redis, yard.cfg.auth, None)
                         .bootstrap_platform_key("smoke")).plaintext
        admin = web.AppRunner(create_admin_app(yard.cfg), access_log=None)
        await admin.setup()
        try:
            await web.TCPSite(admin, LOOPBACK, yard.cfg.admin.port).start()
            yield Stack(yard.base_url.removesuffix("/v1"),
                        f"http://{LOOPBACK}:{yard.cfg.admin.port}", admin_key)
        finally:
            await admin.cleanup()


async def test_the_mixed_suite_runs_headless_and_reports_its_rows(
        stack: Stack, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    await provision(stack.admin_url, stack.admin_key, TenantPlan(tenants=3, abusive_rpm=10),
                    keys_file)
    run = LocustRun(tmp_path, "locust", stack.api_url, keys_file, users=6, duration_s=LOCUST_S,
                    workers=0, custom=["--rps-per-user", "3", "--abusive-rps", "10"])
    await run.run()
    rows = read_stats(run.prefix)
    assert problems(rows) == [], (run.log.read_text()[-3000:], rows)
    for name in TENANT_REQUESTS:
        assert rows[("POST", name)].requests > 0
    for name in STREAMS:
        ttft, itl = rows[("TTFT", name)], rows[("ITL", name)]
        assert ttft.requests > 0 and ttft.median_ms > 0
        assert itl.requests > 0 and itl.median_ms > 0
    # At 10 requests/s against 10 a minute, most are refused (and succeed as expected).
    refused = rows[EXPECTED_429].requests
    assert refused > rows[("POST", "chat (abusive tenant)")].requests / 2
    assert Path(f"{run.prefix}.html").stat().st_size > 0
