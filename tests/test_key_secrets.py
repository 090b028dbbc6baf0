"""T7 short form, on a private stack (Redis db 14): after 100 keys are
created and used (served, refused, revoked, streamed, sent in a URL), no
secret and no 12-character piece of one is anywhere: not in Redis (every key
and value, by type, streams included), the NATS usage stream (its messages
and its files), ClickHouse (every row of every table) or the logs. A key
whose checksum is wrong is refused before any key lookup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from actors.control_plane import API_KEY_KEY, ControlPlane, NewKey, tenant_with_key
from actors.control_store import connect_redis
from actors.control_tx import nats_publisher
from scheduler import apikeys
from scheduler.config import dump_config
from scheduler.control import SYSTEM
from scheduler.wire import USAGE_QUERY_SUBJECT, UsageQuery, encode, usage_reply_decoder
from tests.harness import MODEL, Switchyard, nats_client, private_switchyard, wait_until

pytestmark = pytest.mark.integration
REDIS_DB = 14
KEYS = 100
PIECE_CHARS = 12
API_KEY_PREFIX = API_KEY_KEY.format(key_id="")
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "secrets"}], "max_tokens": 2}
# Prints every row of every table of the metering database (run in a child:
# chDB allows one engine per process), as text; aggregate states (the
# rollups' quantiles, numbers only) cannot be read as rows and are left out.
DUMP_CHDB = """
import sys
from analytics.store import open_store
from scheduler.config import config_from_json
cfg = config_from_json(open(sys.argv[1], 'rb').read())
store = open_store(cfg.metering.clickhouse, cfg.var_dir)
db = cfg.metering.clickhouse.database
columns = {}
for table, name, kind in store.client.query(
        f"SELECT table, name, type FROM system.columns WHERE database = '{db}'").result_rows:
    if not kind.startswith("AggregateFunction"):
        columns.setdefault(table, []).append(f"toString(`{name}`)")
for table, names in columns.items():
    for row in store.client.query(f"SELECT {', '.join(names)} FROM {db}.`{table}`").result_rows:
        print(table, *row)
store.close()
"""


def _secret_pieces(keys: list[NewKey]) -> set[str]:
    """Every 12-character piece of each key's secret part (the key id is an
    identifier, stored by design; the 4-character hint is too short)."""
    pieces = set()
    for key in keys:
        secret = key.plaintext.split("-", 2)[2]
        pieces.update(secret[i:i + PIECE_CHARS] for i in range(len(secret) - PIECE_CHARS + 1))
    return pieces


def _hits(blob: str, pieces: set[str]) -> int:
    return sum(blob[i:i + PIECE_CHARS] in pieces for i in range(len(blob) - PIECE_CHARS + 1))


async def _redis_dump(redis: aioredis.Redis) -> str:
    parts = []
    async for name in redis.scan_iter(count=500):
        kind = await redis.type(name)
        value: object
        if kind == "string":
            value = await redis.get(name)
        elif kind == "hash":
            value = await redis.hgetall(name)
        elif kind == "set":
            value = await redis.smembers(name)
        elif kind == "zset":
            value = await redis.zrange(name, 0, -1, withscores=True)
        elif kind == "list":
            value = await redis.lrange(name, 0, -1)
        elif kind == "stream":
            value = await redis.xrange(name)
        else:
            raise AssertionError(f"unexpected Redis type {kind} of {name}")
        parts.append(f"{name} {value}")
    assert parts
    return "\n".join(parts)


async def _nats_stream_dump(nats_url: str, stream: str) -> str:
    async with nats_client(nats_url) as nc:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        messages = [await js.get_msg(stream, seq) for seq in range(
            info.state.first_seq, info.state.last_seq + 1)]
        assert messages
        return "\n".join(m.data.decode() + str(m.headers) for m in messages)


async def _usage_requests(nats_url: str, tenant_id: str) -> int:
    async with nats_client(nats_url) as nc:
        reply = usage_reply_decoder.decode((await nc.request(
            USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)), timeout=5)).data)
        return sum(total.requests for total in reply.totals)


@contextlib.asynccontextmanager
async def _monitor(url: str) -> AsyncIterator[list[dict]]:
    """Every command the Redis server runs while inside, in order."""
    seen: list[dict] = []
    started = asyncio.Event()
    async with aioredis.Redis.from_url(url, decode_responses=True) as client:

        async def watch() -> None:
            async with client.monitor() as monitor:
                started.set()
                async for command in monitor.listen():
                    seen.append(command)

        task = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(started.wait(), 5)
            await asyncio.sleep(0.1)  # MONITOR is registered before the first command
            yield seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def _post(http: aiohttp.ClientSession, yard: Switchyard, key: str, body: object = BODY,
                **kwargs: object) -> int:
    async with http.post(yard.base_url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}, **kwargs) as resp:
        await resp.read()
        return resp.status


async def _use_keys(yard: Switchyard, plane: ControlPlane, keys: list[NewKey]) -> int:
    """Served, streamed, refused and revoked requests; returns how many were served."""
    served = 0
    async with aiohttp.ClientSession() as http:
        for key in keys[:20]:
            assert await _post(http, yard, key.plaintext) == 200
            served += 1
        assert await _post(http, yard, keys[20].plaintext, {**BODY, "stream": True}) == 200
        served += 1
        assert await _post(http, yard, keys[21].plaintext, {**BODY, "model": "nope"}) == 404
        assert await _post(http, yard, keys[22].plaintext, {"model": MODEL}) == 400
        await plane.revoke_key(SYSTEM, "t7-revoke", keys[23].record.key_id)
        await wait_until(lambda: _refused(http, yard, keys[23].plaintext), timeout_s=2)
        assert await _post(http, yard, keys[24].plaintext, params={"api_key": keys[24].plaintext}
                           ) == 401
        wrong_secret = keys[25].plaintext[:20] + keys[26].plaintext[20:]
        assert await _post(http, yard, wrong_secret) == 401
    return served


async def _refused(http: aiohttp.ClientSession, yard: Switchyard, key: str) -> bool:
    return await _post(http, yard, key) == 401


async def test_no_secret_is_stored_or_logged_anywhere(
        session_dir: Path, redis_url: str, ray_cluster: None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    work = session_dir / "secrets-stack"
    async with (private_switchyard(work, redis_url, REDIS_DB, lambda cfg: cfg) as yard,
                connect_redis(yard.cfg.redis) as redis,
                nats_client(yard.cfg.nats.url) as nc):
        plane = ControlPlane(redis, yard.cfg.auth, nats_publisher(nc))
        tenant, first = await tenant_with_key(plane, "secrets")
        keys = [first, *[await plane.create_key(SYSTEM, f"t7-{i}", tenant.tenant_id)
                         for i in range(KEYS - 1)]]
        served = await _use_keys(yard, plane, keys)

        # A bad checksum is refused before any lookup; the same key's good
        # form (not cached yet) shows the monitor would have seen one.
        unused = keys[-1]
        flipped = unused.plaintext[:-1] + ("a" if unused.plaintext[-1] != "a" else "b")
        async with _monitor(yard.cfg.redis.url) as seen, aiohttp.ClientSession() as http:
            for _ in range(20):
                assert await _post(http, yard, flipped) == 401
            await redis.get("t7:marker")
            assert await _post(http, yard, unused.plaintext) == 200
            served += 1
            await redis.get("t7:end")

            async def monitored_all() -> bool:
                return any("t7:end" in c["command"] for c in seen)

            await wait_until(monitored_all, timeout_s=5)
        marker = next(i for i, c in enumerate(seen) if "t7:marker" in c["command"])
        # Other parts share the database (the metering actor reads prices when
        # a batch needs them): what counts is any key lookup at all.
        assert [c for c in seen[:marker]
                if c["db"] == REDIS_DB and API_KEY_PREFIX in c["command"]] == []
        assert any(unused.record.key_id in c["command"] for c in seen[marker:])

        async def metered() -> bool:
            return await _usage_requests(yard.cfg.nats.url, tenant.tenant_id) >= served

        await wait_until(metered, timeout_s=30)
        blobs = {"redis": await _redis_dump(redis),
                 "nats stream": await _nats_stream_dump(yard.cfg.nats.url,
                                                        yard.cfg.nats.usage_stream)}
        config_path = work / "t7-config.json"
        config_path.write_bytes(dump_config(yard.cfg))
    dump = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DUMP_CHDB, str(config_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await dump.communicate()
    assert dump.returncode == 0, err.decode()
    blobs["clickhouse"] = out.decode()
    assert tenant.tenant_id in blobs["clickhouse"]
    blobs["logs"] = caplog.text
    blobs["files"] = "\n".join(path.read_bytes().decode(errors="replace")
                               for path in work.rglob("*") if path.is_file()
                               and "chdb" not in path.parts)
    pieces = _secret_pieces(keys)
    assert all(len(k.plaintext) == len(apikeys.issue(b"x").plaintext) for k in keys)
    hits = {where: await asyncio.to_thread(_hits, blob, pieces) for where, blob in blobs.items()}
    assert hits == dict.fromkeys(blobs, 0)
    # The scan can find one: a plaintext placed in a blob is counted.
    assert _hits("x" + keys[0].plaintext, pieces) > 0

