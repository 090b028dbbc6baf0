"""`switchyard tenants|keys|prices|audit` against a running admin server
(real Redis db 11, real control plane), and `switchyard admin-key`, which
bootstraps the first platform admin key into the store."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from deploy.admin_cli import ADMIN_KEY_ENV, run_admin
from deploy.cli import _parser
from scheduler.errors import ConfigError, YardError
from tests.admin_stack import AdminStack, running_admin

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture(scope="module")
async def admin(tmp_path_factory: pytest.TempPathFactory, private_bus: str,
                redis_url: str) -> AsyncIterator[AdminStack]:
    async with running_admin(tmp_path_factory.mktemp("admin-cli"), private_bus,
                             redis_url) as stack:
        yield stack


async def _cli(admin: AdminStack, *argv: str, identity: str = "platform") -> Any:
    args = _parser().parse_args([*argv, "--admin-url", admin.url])
    out = io.StringIO()
    assert await run_admin(admin.cfg, args, out, {ADMIN_KEY_ENV: admin.keys[identity]}) == 0
    return json.loads(out.getvalue())


async def test_tenant_lifecycle(admin: AdminStack) -> None:
    tenant = await _cli(admin, "tenants", "create", "cli-co", "--rpm", "60",
                        "--budget-usd", "12.5", "--budget-period", "day", "--model", "m1")
    assert tenant["limits"]["requests_per_minute"] == 60
    assert tenant["limits"]["budget_nusd"] == 12_500_000_000
    assert tenant["models"] == ["m1"]
    tenant_id = tenant["tenant_id"]
    # An update changes the limits it names and keeps the others.
    updated = await _cli(admin, "tenants", "update", tenant_id, "--tpm", "5000")
    assert updated["limits"]["tokens_per_minute"] == 5000
    assert updated["limits"]["requests_per_minute"] == 60
    assert (await _cli(admin, "tenants", "suspend", tenant_id))["status"] == "suspended"
    assert (await _cli(admin, "tenants", "resume", tenant_id))["status"] == "active"
    assert (await _cli(admin, "tenants", "show", tenant_id))["version"] == updated["version"] + 2
    names = [t["name"] for t in (await _cli(admin, "tenants", "list"))["data"]]
    assert "cli-co" in names and "tenant-a" in names


async def test_key_lifecycle_as_a_tenant_admin(admin: AdminStack) -> None:
    a = admin.tenant_a
    issued = await _cli(admin, "keys", "create", a, "--name", "deploy", identity="a_admin")
    key_id = issued["record"]["key_id"]
    assert issued["key"].startswith(f"sy-{key_id}-")
    listed = await _cli(admin, "keys", "list", a, identity="a_admin")
    assert key_id in [k["key_id"] for k in listed["data"]]
    assert issued["key"] not in json.dumps(listed)
    rotated = await _cli(admin, "keys", "rotate", key_id, "--grace-s", "30",
                         identity="a_admin")
    old = await _cli(admin, "keys", "show", key_id, identity="a_admin")
    assert old["rotated_to"] == rotated["record"]["key_id"] and old["expires_at_s"] > 0
    revoked = await _cli(admin, "keys", "revoke", rotated["record"]["key_id"],
                         identity="a_admin")
    assert revoked["status"] == "revoked"
    entries = (await _cli(admin, "audit", "--tenant", a, "--limit", "1000",
                          identity="a_admin"))["data"]
    assert [e["action"] for e in entries][-3:] == ["key.create", "key.rotate", "key.revoke"]


async def test_prices(admin: AdminStack) -> None:
    set_ = await _cli(admin, "prices", "set", "cli-model", "--input-usd-per-mtok", "0.15",
                      "--cached-input-usd-per-mtok", "0.075", "--output-usd-per-mtok", "0.6",
                      "--effective-from-s", "4102444800")
    assert set_["prices"][0]["input_nusd_per_token"] == 150
    assert set_["prices"][0]["cached_input_nusd_per_token"] == 75
    listed = await _cli(admin, "prices", "list", identity="a_viewer")
    assert "cli-model" in [p["model"] for p in listed["data"]]
    with pytest.raises(ConfigError):
        await _cli(admin, "prices", "set", "m", "--input-usd-per-mtok", "0.0001",
                   "--cached-input-usd-per-mtok", "0", "--output-usd-per-mtok", "0")


async def test_refusals_name_the_status(admin: AdminStack) -> None:
    with pytest.raises(YardError, match="403"):
        await _cli(admin, "tenants", "list", identity="a_viewer")
    with pytest.raises(YardError, match="404"):
        await _cli(admin, "keys", "list", admin.tenant_a, identity="b_admin")
    args = _parser().parse_args(["tenants", "list", "--admin-url", admin.url])
    with pytest.raises(ConfigError, match=ADMIN_KEY_ENV):
        await run_admin(admin.cfg, args, io.StringIO(), {})


async def _run(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.cli", *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bootstrap_key_then_the_command_line(admin: AdminStack, tmp_path: Path) -> None:
    config = tmp_path / "admin.toml"
    config.write_text(f'[redis]\nurl = "{admin.cfg.redis.url}"\n'
                      f'[auth]\nkey_secret = "{admin.cfg.auth.key_secret}"\n'
                      f"[admin]\nport = {admin.cfg.admin.port}\n")
    code, out, err = await _run("admin-key", "--config", str(config), "--name", "first",
                                env={})
    assert code == 0, err
    key = out.strip()
    assert key.startswith("sy-") and len(out.splitlines()) == 1
    code, out, err = await _run("tenants", "list", "--config", str(config),
                                env={ADMIN_KEY_ENV: key})
    assert code == 0, err
    assert "tenant-a" in [t["name"] for t in json.loads(out)["data"]]
    code, _, err = await _run("tenants", "list", "--config", str(config),
                              env={ADMIN_KEY_ENV: key + "x"})
    assert code == 1 and "401" in err
