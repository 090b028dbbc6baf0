"""T35 (and T7's logs), at debug: a private stack (Redis db 28) with every
process logging at debug (the ingress in this process and one of its own,
scheduler, quota shard and metering actors in Ray workers) serves and
refuses requests whose prompts carry a canary: served, streamed, over NATS,
a bad key, a bad checksum, over the rate limit, an invalid body, a media URL
refused, a replica answering 500. Afterwards no log (the pytest capture, the
stack's log files, the Ray workers' stdout and stderr) holds the canary or
any 12-character piece of a key's secret."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import ray

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import connect_redis
from loadtests.simulator.faults import FaultSpec
from scheduler import apikeys
from scheduler.config import Config
from scheduler.control import SYSTEM
from scheduler.tenancy import TenantLimits
from scheduler.wire import USAGE_QUERY_SUBJECT, UsageQuery, encode, usage_reply_decoder
from tests.harness import (
    MODEL,
    Switchyard,
    more_ingresses,
    nats_client,
    private_switchyard,
    wait_until,
)

pytestmark = pytest.mark.integration
REDIS_DB = 28
PIECE_CHARS = 12
CANARY = "canary-" + secrets.token_hex(8)


def _debug(cfg: Config) -> Config:
    return msgspec.structs.replace(cfg, log_level="debug")


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2, **extra,
            "messages": [{"role": "user", "content": f"say {CANARY} back"}]}


def _secret_pieces(keys: list[str]) -> set[str]:
    pieces = set()
    for key in keys:
        secret = key.split("-", 2)[2]
        pieces.update(secret[i:i + PIECE_CHARS] for i in range(len(secret) - PIECE_CHARS + 1))
    return pieces


def _leaks(blob: str, pieces: set[str]) -> list[str]:
    found = [CANARY] if CANARY in blob else []
    found += [blob[i:i + PIECE_CHARS] for i in range(len(blob) - PIECE_CHARS + 1)
              if blob[i:i + PIECE_CHARS] in pieces]
    return found


async def _post(http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> int:
    async with http.post(url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def _malformed(api: str, key: str) -> None:
    """Requests aiohttp cannot parse, its error quoting a key or the canary."""
    host, port = api.removeprefix("http://").removesuffix("/v1").split(":")
    for raw in (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {key}\x01\r\n\r\n",
                f"GET /v1/models?q={CANARY}&k={key} HTTP/1.1\x01\r\n\r\n",
                f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {key}{'x' * 9000}\r\n\r\n"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw.encode())
        assert b" 400 " in (await reader.read()).split(b"\r\n", 1)[0]
        writer.close()
        await writer.wait_closed()


async def _set_faults(yard: Switchyard, faults: FaultSpec) -> None:
    assert yard.fleet is not None
    for replica in yard.fleet.replicas:
        replica.set_faults(faults)


async def _requests(yard: Switchyard, apis: list[str], key: str, limited_key: str) -> int:
    """Every kind of answer, on each ingress; returns how many `key` was served."""
    flipped = key[:-1] + ("a" if key[-1] != "a" else "b")
    unknown = apikeys.issue(b"another-server").plaintext
    served = 0
    async with aiohttp.ClientSession() as http:
        for api in apis:
            assert await _post(http, api, key, _body()) == 200
            assert await _post(http, api, key, _body(stream=True)) == 200
            served += 2
            assert await _post(http, api, unknown, _body()) == 401
            assert await _post(http, api, flipped, _body()) == 401
            assert await _post(http, api, key, _body(max_tokens=-1)) == 400
            media = _body()
            media["messages"][0]["content"] = [
                {"type": "text", "text": CANARY},
                {"type": "image_url", "image_url": {"url": f"file:///{CANARY}"}}]
            assert await _post(http, api, key, media) == 400
            await _malformed(api, key)
        assert await _post(http, apis[0], limited_key, _body()) == 200
        assert await _post(http, apis[0], limited_key, _body()) == 429
        await _set_faults(yard, FaultSpec(error_status=500))
        try:
            assert await _post(http, apis[0], key, _body()) == 502
        finally:
            await _set_faults(yard, FaultSpec())
    async with nats_client(yard.cfg.nats.url) as nc:
        for who in (key, flipped):
            await nc.request("yard.v1.chat.completions", msgspec.json.encode(_body()),
                             timeout=5, headers={"Authorization": f"Bearer {who}"})
        served += 1
    return served


async def _metered(nats_url: str, tenant_id: str, served: int) -> bool:
    async with nats_client(nats_url) as nc:
        reply = usage_reply_decoder.decode((await nc.request(
            USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)), timeout=5)).data)
        return sum(total.requests for total in reply.totals) >= served


def _log_files(work: Path) -> list[Path]:
    ray_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [*work.rglob("*.log"), *ray_logs.glob("worker-*.out"), *ray_logs.glob("worker-*.err")]


async def test_no_prompt_and_no_key_piece_in_any_log_at_debug(
        session_dir: Path, redis_url: str, ray_cluster: None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    work = session_dir / "log-canaries"
    async with private_switchyard(work, redis_url, REDIS_DB, _debug) as yard:
        async with connect_redis(yard.cfg.redis) as redis:
            plane = ControlPlane(redis, yard.cfg.auth, None)
            tenant, key = await tenant_with_key(plane, "canaries")
            limited = await plane.create_tenant(SYSTEM, "lc-1", "canaries-limited",
                                                limits=TenantLimits(requests_per_minute=1))
            limited_key = await plane.create_key(SYSTEM, "lc-2", limited.tenant_id)
        async with more_ingresses(yard, work, 1) as child_apis:
            served = await _requests(yard, [yard.base_url, *child_apis], key.plaintext,
                                     limited_key.plaintext)
        await wait_until(lambda: _metered(yard.cfg.nats.url, tenant.tenant_id, served),
                         timeout_s=30)
    pieces = _secret_pieces([yard.api_key, key.plaintext, limited_key.plaintext])
    # The simulated replicas stand in for vLLM: their logs are not switchyard's.
    blobs = {"pytest": "\n".join(r.getMessage() + str(r.exc_text or "")
                                 for r in caplog.records
                                 if not r.name.startswith("loadtests"))}
    for path in _log_files(work):
        blobs[str(path)] = path.read_bytes().decode(errors="replace")
    assert any("DEBUG" in blob for blob in blobs.values())
    # aiohttp did log the unparsable requests, without their bytes.
    assert "bytes are not logged" in blobs["pytest"]
    leaks = {where: found for where, blob in blobs.items()
             if (found := await asyncio.to_thread(_leaks, blob, pieces))}
    assert leaks == {}
    # The scan finds what it looks for.
    assert _leaks(f"x{CANARY}x{key.plaintext}", pieces)[0] == CANARY
    assert len(_leaks(key.plaintext, pieces)) > 1
