"""T10 short form: a process making random control-plane mutations is
SIGKILLed at random points, several times. Every mutation it saw commit has
exactly one audit entry; an entry it did not see commit can only be the one
in flight when it was killed; replaying the log's `after` views rebuilds the
store exactly (no change without its entry, no entry without its change);
the hash chain verifies. Redis database 12."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

import msgspec
import pytest

from actors.control_plane import API_KEY_KEY, PRICES_KEY, TENANT_KEY, TENANTS_KEY
from actors.control_store import connect_redis
from actors.control_tx import audit_entries, verify_audit
from scheduler.audit import AuditEntry
from scheduler.config import RedisConfig
from scheduler.control import key_from_fields, public_key, public_tenant, tenant_from_fields
from tests.harness import PROJECT_DIR

pytestmark = pytest.mark.integration
REDIS_DB = 12
KILLS = 4


def _normal(view: object) -> object:
    return msgspec.json.decode(msgspec.json.encode(view))


def _replay(entries: list[AuditEntry]) -> tuple[dict, dict, dict]:
    """Tenants, keys and prices as the log's `after` views say they are."""
    tenants: dict[str, object] = {}
    keys: dict[str, object] = {}
    prices: dict[str, str] = {}
    for entry in entries:
        after = msgspec.json.decode(entry.after)
        if entry.action.startswith("tenant."):
            tenants[entry.target] = after
        elif entry.action == "key.rotate":
            keys[entry.target] = after["key"]
            keys[after["new_key"]["key_id"]] = after["new_key"]
        elif entry.action.startswith("key."):
            keys[entry.target] = after
        else:
            prices[entry.target] = entry.after
    return tenants, keys, prices


async def _run_until_killed(redis_url: str, seed: int, rng: random.Random,
                            seen: dict[str, set[str]]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.control_mutator", redis_url, str(seed),
        stdout=asyncio.subprocess.PIPE, cwd=PROJECT_DIR,
        env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    assert proc.stdout is not None
    deadline = None
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            what, _, request_id = line.decode().strip().partition(" ")
            seen[what].add(request_id)
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + rng.uniform(0.2, 1.0)
            elif asyncio.get_running_loop().time() >= deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def test_killed_mutators_leave_one_entry_per_commit_and_a_valid_chain(
        redis_url: str) -> None:
    url = redis_url.removesuffix("/0") + f"/{REDIS_DB}"
    async with connect_redis(RedisConfig(url=url)) as redis:
        await redis.flushdb()
        rng = random.Random(10)
        seen: dict[str, set[str]] = {"attempt": set(), "committed": set(), "refused": set()}
        for seed in range(KILLS):
            await _run_until_killed(url, seed, rng, seen)

        entries = await audit_entries(redis)
        logged = [e.request_id for e in entries]
        assert len(seen["committed"]) >= 100, "too few mutations to tell anything"
        assert len(logged) == len(set(logged)), "a mutation with more than one entry"
        assert seen["committed"] <= set(logged), "a committed mutation without its entry"
        unreported = set(logged) - seen["committed"]
        assert unreported <= seen["attempt"] - seen["refused"]
        assert len(unreported) <= KILLS
        assert (await verify_audit(redis)).ok

        tenants, keys, prices = _replay(entries)
        stored_tenants = {}
        for tenant_id in await redis.smembers(TENANTS_KEY):
            fields = await redis.hgetall(TENANT_KEY.format(tenant_id=tenant_id))
            stored_tenants[tenant_id] = _normal(public_tenant(
                tenant_from_fields(tenant_id, fields)))
        stored_keys = {}
        async for name in redis.scan_iter(API_KEY_KEY.format(key_id="*")):
            key_id = name.rpartition(":")[2]
            stored_keys[key_id] = _normal(public_key(key_from_fields(
                key_id, await redis.hgetall(name))))
        assert stored_tenants == tenants
        assert stored_keys == keys
        assert await redis.hgetall(PRICES_KEY) == prices
