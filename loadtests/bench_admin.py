"""Admin API latency: the admin server in its own process (`python -m
router.admin_main`) over real redis-server and nats-server on free loopback
ports, called sequentially: a read (GET a tenant), a mutation (issue a key:
one audited WATCH/MULTI/EXEC), and a tenant admin's audit listing on logs
of growing length, which scans the log from its start until it has a page:
quick for a tenant whose entries come early, the whole log for a quiet
tenant (the worst case, measured here). Prints JSON and a
short table (p50/p99 in milliseconds).

    python -m loadtests.bench_admin [--calls 300] [--log-entries 1000,5000]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from actors.control_plane import ControlPlane
from actors.control_store import connect_redis
from deploy.procs import ChildProcess, free_port, python_module, start_nats, start_redis
from deploy.replica_fleet import healthy
from scheduler.config import AdminConfig, AuthConfig, Config, NatsConfig, RedisConfig, dump_config
from scheduler.control import SYSTEM


def _quantiles_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)}


async def _timed(calls: int, call: Callable[[], Awaitable[int]]) -> dict[str, float]:
    samples_s = []
    for _ in range(calls):
        started = time.perf_counter()
        status = await call()
        samples_s.append(time.perf_counter() - started)
        if status >= 400:
            raise RuntimeError(f"admin call answered {status}")
    return _quantiles_ms(samples_s)


async def run(calls: int, log_entries: list[int]) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-admin-"))
    nats_proc, nats_url = await start_nats(work / "nats", work / "logs")
    redis_proc, redis_url = await start_redis(work / "redis", work / "logs", persist=False)
    cfg = Config(var_dir=str(work), admin=AdminConfig(port=free_port()),
                 nats=NatsConfig(url=nats_url), redis=RedisConfig(url=redis_url),
                 auth=AuthConfig(key_secret=secrets.token_hex(32)))
    config_path = work / "config.json"
    config_path.write_bytes(dump_config(cfg))
    admin = ChildProcess("admin", python_module("router.admin_main", "--config",
                                                str(config_path)), work / "logs" / "admin.log")
    redis = connect_redis(cfg.redis)
    results: dict[str, object] = {"calls": calls}
    try:
        await admin.start()
        base = f"http://127.0.0.1:{cfg.admin.port}"
        async with aiohttp.ClientSession() as session:
            await admin.wait_ready(lambda: healthy(session, base + "/healthz"), timeout_s=30)
            plane = ControlPlane(redis, cfg.auth, None)
            tenant = await plane.create_tenant(SYSTEM, "bench", "bench")
            other = await plane.create_tenant(SYSTEM, "bench", "other")
            platform = (await plane.bootstrap_platform_key("bench")).plaintext
            quiet = await plane.create_tenant(SYSTEM, "bench", "quiet")
            quiet_admin = (await plane.create_key(SYSTEM, "bench", quiet.tenant_id,
                                                  role="tenant_admin")).plaintext

            async def call(method: str, path: str, key: str, body: object = None) -> int:
                async with session.request(method, base + path, json=body, headers={
                        "Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    return resp.status

            t = f"/admin/v1/tenants/{tenant.tenant_id}"
            results["get_tenant"] = await _timed(calls, lambda: call("GET", t, platform))
            results["create_key"] = await _timed(calls, lambda: call(
                "POST", t + "/keys", platform, {"name": "k"}))
            audit = []
            for entries in log_entries:
                # All but two of its entries are other tenants'.
                while (await redis.xlen("sy:audit")) < entries:
                    await plane.create_key(SYSTEM, "bench-fill", other.tenant_id)
                audit.append({"log_entries": entries, **await _timed(
                    max(10, calls // 10),
                    lambda: call("GET", "/admin/v1/audit?limit=100", quiet_admin))})
            results["audit_quiet_tenant_admin"] = audit
    finally:
        await redis.aclose()
        await admin.stop()
        await redis_proc.stop()
        await nats_proc.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_admin")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--log-entries", default="1000,5000",
                        help="audit log lengths to list at (comma-separated)")
    args = parser.parse_args(argv)
    results = uvloop.run(run(args.calls, [int(n) for n in args.log_entries.split(",")]))
    print(json.dumps(results))
    for name in ("get_tenant", "create_key"):
        row = results[name]
        print(f"{name:<24} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms",  # type: ignore[index]
              file=sys.stderr)
    for row in results["audit_quiet_tenant_admin"]:  # type: ignore[attr-defined]
        print(f"audit, {row['log_entries']:>6} entries p50 {row['p50_ms']:7.2f} ms  "
              f"p99 {row['p99_ms']:7.2f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
