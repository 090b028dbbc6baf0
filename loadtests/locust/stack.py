"""The stack a locust run drives: `switchyard up` as a user runs it (its own
process group, on free loopback ports, under the run's directory), and the
tenants, keys, limits and prices made through the admin API, written to the
keys file the locustfile reads.

The simulated replicas are fast (1 ms per decode step, prefill at a million
tokens per second, 256 sequences each) so that what saturates is the router
(ingress, NATS placement, quota admission), not the replicas. A quota
call may take 2 s before the admission fails closed (default 0.25 s): on this
shared 2-core machine the shard actor waits that long for a core at times,
as tests/test_quota_http.py found; the suites count every 503 as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from deploy.admin_cli import AdminClient
from deploy.procs import LOOPBACK, free_port, free_port_block
from scheduler.admin_api import PREFIX
from scheduler.tenancy import NUSD_PER_USD, usd_per_mtok_to_nusd_per_token

PROJECT_DIR = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 90.0
MODEL = "switchyard-tiny"
# Prices of the model (USD per million tokens): input, cached input, output.
PRICES_USD_PER_MTOK = (0.5, 0.25, 1.5)


@dataclass(frozen=True)
class TenantPlan:
    """Tenants with room to spare, and one abusive tenant held to a low rate."""

    tenants: int = 20
    rpm: int = 1_000_000
    budget_usd: float = 1000.0
    abusive_rpm: int = 30
    abusive_max_concurrent: int = 2


def distinct_ports(singles: int, block: int) -> tuple[list[int], int]:
    """`singles` free ports and the base of `block` consecutive ones, none
    the same (each is only free when asked: the block is asked first)."""
    base = free_port_block(block)
    ports: list[int] = []
    while len(ports) < singles:
        port = free_port()
        if port not in ports and not base <= port < base + block:
            ports.append(port)
    return ports, base


def stack_toml(var_dir: Path, replicas: int = 2) -> str:
    (ingress, admin, nats, redis, metrics), sim_base = distinct_ports(5, replicas)
    return f"""
var_dir = "{var_dir}"
[ingress]
port = {ingress}
[admin]
port = {admin}
[nats]
url = "nats://{LOOPBACK}:{nats}"
[redis]
url = "redis://{LOOPBACK}:{redis}/0"
[quota]
call_timeout_s = 2.0
[scheduler]
metrics_port = {metrics}
[simulator]
replicas = {replicas}
base_port = {sim_base}
decode_ms_per_token = 1.0
batch_ms_per_seq = 0.01
prefill_tokens_per_s = 1000000.0
max_num_seqs = 256
"""


@dataclass
class UpStack:
    """A running `switchyard up`; stop() ends it (SIGTERM to its PID, then its
    process group if it does not stop in time)."""

    proc: asyncio.subprocess.Process
    api_url: str = ""
    admin_url: str = ""
    config_path: Path = field(default_factory=Path)
    lines: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, work: Path, up_args: list[str], ray_worker_niceness: int) -> UpStack:
        work.mkdir(parents=True, exist_ok=True)
        config = work / "switchyard.toml"
        config.write_text(stack_toml(work / "var"))
        log = (work / "up.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deploy.cli", "up", "--config", str(config), *up_args,
            cwd=PROJECT_DIR, stdout=asyncio.subprocess.PIPE, stderr=log,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR),
                 # Ray nices its workers to 15 by default, and the scheduler and quota
                 # actors are on the request path: behind every other busy process of
                 # a shared machine they stopped answering in time (docs/benchmarks.md, Load tests).
                 "RAY_worker_niceness": str(ray_worker_niceness)})
        log.close()
        stack = cls(proc, config_path=work / "var" / "run" / "config.json")
        try:
            await asyncio.wait_for(stack._until_up(), UP_TIMEOUT_S)
        except BaseException:
            await stack.stop()
            raise
        return stack

    async def _until_up(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            self.lines.append(line.rstrip())
            if line.startswith("switchyard is up"):
                self.api_url = re.search(r"API (\S+)", line).group(1).removesuffix("/v1")
                self.admin_url = re.search(r"admin (\S+)", line).group(1).removesuffix(
                    "/admin/v1")
                return
        raise RuntimeError("switchyard up exited before it was up:\n" + "\n".join(self.lines))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()

    async def save_metrics(self, path: Path) -> None:
        """The ingress's /metrics as the run left them (where its time went)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{self.api_url}/metrics") as resp:
                path.write_bytes(await resp.read())

    async def admin_key(self) -> str:
        """A platform admin key, from the CLI (`switchyard admin-key`)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deploy.cli", "admin-key", "--config", str(self.config_path),
            "--name", "loadtest", cwd=PROJECT_DIR, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise RuntimeError(f"switchyard admin-key failed ({proc.returncode})")
        return out.decode().strip()


async def provision(admin_url: str, admin_key: str, plan: TenantPlan, keys_file: Path) -> dict:
    """Creates the model's price, the tenants with their limits and a key each,
    through the admin API; writes what the locustfile needs to `keys_file`."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        client = AdminClient(session, admin_url, admin_key)
        nusd = [usd_per_mtok_to_nusd_per_token(p) for p in PRICES_USD_PER_MTOK]
        # The store takes prices from the next second on; the tenants' first
        # requests must find it in force (a budget without a price is a 403).
        effective_s = int(time.time()) + 1
        await client.call("POST", f"{PREFIX}/prices/{MODEL}", {
            "effective_from_s": effective_s, "input_nusd_per_token": nusd[0],
            "cached_input_nusd_per_token": nusd[1], "output_nusd_per_token": nusd[2]})
        budget_nusd = round(plan.budget_usd * NUSD_PER_USD)
        tenants = [await _tenant_with_key(client, f"load-{i:03d}", {
            "requests_per_minute": plan.rpm, "budget_nusd": budget_nusd})
            for i in range(plan.tenants)]
        abusive = await _tenant_with_key(client, "abusive", {
            "requests_per_minute": plan.abusive_rpm, "budget_nusd": budget_nusd,
            "max_concurrent_requests": plan.abusive_max_concurrent})
    await asyncio.sleep(max(0.0, effective_s - time.time()))
    keys = {"model": MODEL, "tenants": tenants, "abusive": abusive}
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    keys_file.write_text(json.dumps(keys, indent=1))
    keys_file.chmod(0o600)
    return keys


async def _tenant_with_key(client: AdminClient, name: str, limits: dict) -> dict[str, str]:
    tenant = await client.call("POST", f"{PREFIX}/tenants", {"name": name, "limits": limits})
    issued = await client.call("POST", f"{PREFIX}/tenants/{tenant['tenant_id']}/keys",
                               {"name": f"{name}-load"})
    return {"name": name, "tenant_id": tenant["tenant_id"], "key": issued["key"]}


async def warm_up(api_url: str, keys: dict, attempts: int = 20) -> None:
    """One small request per tenant before anything is measured: keys are
    looked up, the quota shards read each tenant's ledger and grant its
    first lease; a 503 meanwhile (a shard still starting) is asked again."""
    body = {"model": keys["model"], "max_tokens": 1,
            "messages": [{"role": "user", "content": "warm up"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for tenant in [*keys["tenants"], keys["abusive"]]:
            headers = {"Authorization": f"Bearer {tenant['key']}"}
            for _ in range(attempts):
                async with session.post(f"{api_url}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        break
                    if resp.status != 503:
                        raise RuntimeError(f"warm-up of {tenant['name']}: {resp.status}")
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"warm-up of {tenant['name']}: still 503")
