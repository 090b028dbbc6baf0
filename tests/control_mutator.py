"""Random control-plane mutations until killed, for tests/test_audit_crash.py.

`python -m tests.control_mutator REDIS_URL SEED` prints `attempt <request id>`
before each mutation and `committed <request id>` once it returned (or
`refused <request id>` when the store refused it). Every mutation it tries
changes something, so each committed one must leave exactly one audit entry.
"""

from __future__ import annotations

import random
import sys
import time

import uvloop

from actors.control_plane import ControlPlane
from actors.control_store import connect_redis
from scheduler.config import AuthConfig, RedisConfig
from scheduler.control import SYSTEM
from scheduler.errors import Conflict, InvalidRequest, RecordNotFound
from scheduler.tenancy import Price, TenantLimits

AUTH = AuthConfig(key_secret="crash-secret", rotation_grace_s=3_600.0)


async def mutate(plane: ControlPlane, rng: random.Random, request_id: str, n: int) -> None:
    tenants = [t.tenant_id for t in await plane.list_tenants(SYSTEM)]
    if not tenants or rng.random() < 0.1:
        await plane.create_tenant(SYSTEM, request_id, f"tenant-{request_id}")
        return
    tenant_id = rng.choice(tenants)
    keys = await plane.list_keys(SYSTEM, tenant_id)
    active = [k for k in keys if k.status == "active" and not k.rotated_to]
    op = rng.choice(("limits", "status", "key", "key", "rotate", "revoke", "price"))
    if op == "limits":
        await plane.update_tenant(SYSTEM, request_id, tenant_id,
                                  limits=TenantLimits(requests_per_minute=n + 1))
    elif op == "status":
        tenant = await plane.get_tenant(SYSTEM, tenant_id)
        change = plane.resume_tenant if tenant.status == "suspended" else plane.suspend_tenant
        await change(SYSTEM, request_id, tenant_id)
    elif op == "price":
        await plane.set_price(SYSTEM, request_id, rng.choice(("m1", "m2")), Price(
            effective_from_s=int(time.time()) + 1_000 + n, input_nusd_per_token=n,
            cached_input_nusd_per_token=0, output_nusd_per_token=2 * n))
    elif op in ("rotate", "revoke") and active:
        key_id = rng.choice(active).key_id
        if op == "rotate":
            await plane.rotate_key(SYSTEM, request_id, key_id)
        else:
            await plane.revoke_key(SYSTEM, request_id, key_id)
    else:
        await plane.create_key(SYSTEM, request_id, tenant_id, name=f"k{n}")


async def main(redis_url: str, seed: int) -> None:
    async with connect_redis(RedisConfig(url=redis_url)) as redis:
        plane = ControlPlane(redis, AUTH, None)
        rng = random.Random(seed)
        for n in range(1_000_000):
            request_id = f"m{seed}-{n}"
            print("attempt", request_id, flush=True)
            try:
                await mutate(plane, rng, request_id, n)
            except (Conflict, RecordNotFound, InvalidRequest):
                print("refused", request_id, flush=True)
                continue
            print("committed", request_id, flush=True)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
