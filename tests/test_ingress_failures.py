"""What clients see when parts fail: a dead replica (502), no scheduler
(503 + Retry-After without the ingress's fallback placement, served with
it); and the health, readiness and metrics endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from aiohttp import web

from actors.control_store import ReplicaRegistry, connect_redis
from actors.quota import QuotaService
from deploy.procs import LOOPBACK, free_port, start_nats
from router.app import create_app
from scheduler.config import IngressConfig, NatsConfig
from scheduler.wire import REGISTRY_CHANGED_SUBJECT, RegistryChanged, ReplicaInfo, encode
from tests.harness import Switchyard, nats_client, price_models, wait_until

pytestmark = pytest.mark.integration


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _post(url: str, key: str, body: dict[str, object]) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session, session.post(
            url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_a_dead_replica_is_a_502(switchyard: Switchyard) -> None:
    ghost = ReplicaInfo(id="ghost-0", url=f"http://{LOOPBACK}:{free_port()}", models=("ghost",))
    async with (connect_redis(switchyard.cfg.redis) as redis,
                nats_client(switchyard.cfg.nats.url) as nc):
        try:
            await ReplicaRegistry(redis).put_replica(ghost)
            await price_models(redis, ["ghost"])
            await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))
            url = switchyard.base_url + "/chat/completions"

            async def registered() -> bool:
                return (await _post(url, switchyard.api_key, _chat("ghost")))[0] != 404

            await wait_until(registered, timeout_s=5)
            status, _, body = await _post(url, switchyard.api_key, _chat("ghost"))
            assert status == 502 and body["error"]["code"] == "upstream_failed"
        finally:
            await ReplicaRegistry(redis).remove_replica(ghost.id)
            await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))


@pytest_asyncio.fixture(params=[False, True], ids=["no-fallback", "fallback"])
async def lonely_ingress(switchyard: Switchyard,
                         request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, bool]]:
    """An ingress on its own nats-server, where no scheduler listens; with
    or without its fallback placement (the param)."""
    nats_proc, nats_url = await start_nats(
        Path(switchyard.cfg.var_dir) / "lonely-nats",
        Path(switchyard.cfg.var_dir) / "logs")
    cfg = msgspec.structs.replace(switchyard.cfg, nats=NatsConfig(url=nats_url),
                                  ingress=IngressConfig(port=free_port(),
                                                        fallback_placement=request.param))
    quota = QuotaService(cfg, 0)  # admission passes; placement finds no scheduler
    await quota.start()
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, cfg.ingress.port).start()
    yield f"http://{LOOPBACK}:{cfg.ingress.port}", request.param
    await runner.cleanup()
    await quota.aclose()
    await nats_proc.stop()


async def test_no_scheduler_is_a_503_or_placed_by_the_ingress(switchyard: Switchyard,
                                                               lonely_ingress: tuple[str, bool]
                                                               ) -> None:
    root, fallback = lonely_ingress
    url = root + "/v1/chat/completions"
    status, headers, body = await _post(url, switchyard.api_key, _chat("switchyard-tiny"))
    if not fallback:
        assert status == 503 and body["error"]["code"] == "no_capacity"
        assert int(headers["Retry-After"]) >= 1
        return
    # Placed by the ingress over the registry (the session's simulated replicas).
    assert status == 200, body
    assert headers["x-switchyard-replica"].startswith("sim-")
    async with aiohttp.ClientSession() as session:
        async with session.get(root + "/metrics") as resp:
            text = await resp.text()
    assert 'switchyard_placement_fallbacks_total{reason="unreachable"} 1.0' in text
    assert "switchyard_placement_fallback_active 1.0" in text
    # The next one within the probe interval does not wait for a scheduler.
    status, _, _ = await _post(url, switchyard.api_key, _chat("switchyard-tiny"))
    assert status == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(root + "/metrics") as resp:
            text = await resp.text()
    assert 'switchyard_placement_fallbacks_total{reason="unreachable"} 2.0' in text


async def test_health_readiness_and_metrics(switchyard: Switchyard) -> None:
    root = switchyard.base_url.removesuffix("/v1")
    await _post(switchyard.base_url + "/chat/completions", switchyard.api_key,
                _chat("switchyard-tiny"))
    async with aiohttp.ClientSession() as session:
        async with session.get(root + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(root + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True
        async with session.get(root + "/metrics") as resp:
            text = await resp.text()
    assert 'switchyard_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "switchyard_placement_duration_seconds_bucket" in text
    assert "switchyard_ttft_seconds_count" in text
