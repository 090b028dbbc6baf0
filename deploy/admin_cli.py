"""`switchyard tenants|keys|prices|audit|usage|billing ...`: the admin API from the shell,
printing its JSON answers; and `switchyard admin-key`, which issues a
platform admin key straight into the control store (the first one has no
key to ask the API with).

The admin key comes from SWITCHYARD_ADMIN_KEY, or `--admin-key` (which, like
any argument, lands in shell history and in `ps`: prefer the variable). It
is never a positional argument.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import msgspec

from deploy.billing_cli import BILLING_COMMANDS, request_path
from deploy.billing_cli import add_parsers as add_billing_parsers
from scheduler.admin_api import PREFIX, KeyCreate, KeyRotate, PriceSet, TenantCreate
from scheduler.config import Config
from scheduler.errors import ConfigError, YardError
from scheduler.tenancy import NUSD_PER_USD, usd_per_mtok_to_nusd_per_token

ADMIN_KEY_ENV = "SWITCHYARD_ADMIN_KEY"
ADMIN_COMMANDS = ("tenants", "keys", "prices", "audit", *BILLING_COMMANDS)
HTTP_TIMEOUT_S = 10.0
# cli flag -> TenantLimits field
LIMIT_FLAGS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute",
               "max_concurrent": "max_concurrent_requests", "max_tokens_cap": "max_tokens_cap",
               "budget_period": "budget_period"}


class AdminCallFailed(YardError):
    """The admin API answered with an error (its status and message)."""


def add_parsers(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help=config_help)
    common.add_argument("--admin-url", help="admin API base URL (default: from the config)")
    common.add_argument("--admin-key", help=f"admin key (default: ${ADMIN_KEY_ENV}; a flag "
                                            "lands in shell history, the variable does not)")
    tenants = sub.add_parser("tenants", help="create, list, show, update, suspend, resume")
    action = tenants.add_subparsers(dest="action", required=True)
    create = action.add_parser("create", parents=[common], help="create a tenant")
    create.add_argument("name")
    _tenant_flags(create)
    action.add_parser("list", parents=[common], help="every tenant")
    for name, text in (("show", "one tenant"), ("suspend", "its keys stop working"),
                       ("resume", "its keys work again")):
        action.add_parser(name, parents=[common], help=text).add_argument("tenant_id")
    update = action.add_parser("update", parents=[common],
                               help="change limits (the flags given), models, priority")
    update.add_argument("tenant_id")
    _tenant_flags(update)
    keys = sub.add_parser("keys", help="create, list, show, rotate, revoke API keys")
    action = keys.add_subparsers(dest="action", required=True)
    create = action.add_parser("create", parents=[common], help="issue a key (shown once)")
    create.add_argument("tenant_id")
    create.add_argument("--name", default="")
    create.add_argument("--role", default="user",
                        choices=("user", "viewer", "tenant_admin", "platform_admin"))
    create.add_argument("--expires-at-s", type=int, default=0, help="unix seconds; 0: never")
    action.add_parser("list", parents=[common], help="a tenant's keys (hints only)"
                      ).add_argument("tenant_id")
    action.add_parser("show", parents=[common], help="one key").add_argument("key_id")
    rotate = action.add_parser("rotate", parents=[common], help="issue a replacement")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=float, help="how long the old key keeps working")
    action.add_parser("revoke", parents=[common], help="stop a key now").add_argument("key_id")
    prices = sub.add_parser("prices", help="set or list model prices")
    action = prices.add_subparsers(dest="action", required=True)
    price = action.add_parser("set", parents=[common], help="a model's price from a date on")
    price.add_argument("model")
    for flag in ("input", "cached-input", "output"):
        price.add_argument(f"--{flag}-usd-per-mtok", type=float, required=True)
    price.add_argument("--effective-from-s", type=int, help="unix seconds (default: now)")
    action.add_parser("list", parents=[common], help="every model's prices")
    audit = sub.add_parser("audit", parents=[common], help="audit entries, oldest first")
    audit.add_argument("--tenant", help="only entries about this tenant id")
    audit.add_argument("--after-version", type=int, default=0)
    audit.add_argument("--limit", type=int, default=100)
    add_billing_parsers(sub, common)


def _tenant_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--max-concurrent", type=int, help="requests in flight")
    parser.add_argument("--budget-usd", type=float, help="spend per budget period")
    parser.add_argument("--budget-period", choices=("day", "month"))
    parser.add_argument("--max-tokens-cap", type=int, help="clamp on a request's max_tokens")
    parser.add_argument("--model", action="append", dest="models",
                        help="a model its keys may call (repeatable; default: every model)")


def _limits(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any] | None:
    """`base` with the limit flags given; None when none was."""
    given = {field: getattr(args, flag) for flag, field in LIMIT_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.budget_usd is not None:
        given["budget_nusd"] = round(args.budget_usd * NUSD_PER_USD)
    return {**base, **given} if given else None


def _request(args: argparse.Namespace) -> tuple[str, str, Any]:
    """The (method, path, body) of a command that maps to one call."""
    command, action = args.command, getattr(args, "action", None)
    if command == "tenants":
        t = f"{PREFIX}/tenants/{getattr(args, 'tenant_id', '')}"
        if action == "create":
            body = TenantCreate(name=args.name, models=tuple(args.models or ()))
            raw = msgspec.to_builtins(body)
            raw["limits"] = _limits(args, raw["limits"]) or raw["limits"]
            return "POST", f"{PREFIX}/tenants", raw
        return {"list": ("GET", f"{PREFIX}/tenants", None), "show": ("GET", t, None),
                "suspend": ("POST", t + "/suspend", None),
                "resume": ("POST", t + "/resume", None)}[action]
    if command == "keys":
        k = f"{PREFIX}/keys/{getattr(args, 'key_id', '')}"
        if action == "create":
            return "POST", f"{PREFIX}/tenants/{args.tenant_id}/keys", KeyCreate(
                name=args.name, role=args.role, expires_at_s=args.expires_at_s)
        if action == "list":
            return "GET", f"{PREFIX}/tenants/{args.tenant_id}/keys", None
        if action == "rotate":
            return "POST", k + "/rotate", KeyRotate(grace_s=args.grace_s)
        return {"show": ("GET", k, None), "revoke": ("POST", k + "/revoke", None)}[action]
    if command in BILLING_COMMANDS:
        return "GET", request_path(args), None
    if command == "prices":
        if action == "list":
            return "GET", f"{PREFIX}/prices", None
        return "POST", f"{PREFIX}/prices/{args.model}", _price(args)
    query = f"?after_version={args.after_version}&limit={args.limit}"
    return "GET", f"{PREFIX}/audit" + query + (f"&tenant_id={args.tenant}" if args.tenant
                                                else ""), None


def _price(args: argparse.Namespace) -> PriceSet:
    try:
        nusd = [usd_per_mtok_to_nusd_per_token(v) for v in (
            args.input_usd_per_mtok, args.cached_input_usd_per_mtok, args.output_usd_per_mtok)]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # A price starts now or later: the next second is the earliest the
    # store cannot find already past.
    effective_s = args.effective_from_s or int(time.time()) + 1
    return PriceSet(effective_from_s=effective_s, input_nusd_per_token=nusd[0],
                    cached_input_nusd_per_token=nusd[1], output_nusd_per_token=nusd[2])


class AdminClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else msgspec.json.encode(body)
        headers = {**self._headers, **({"Content-Type": "application/json"} if data else {})}
        try:
            async with self._session.request(method, self._base_url + path, data=data,
                                             headers=headers) as resp:
                # A CSV export is printed as served.
                answer = (await resp.text() if resp.content_type == "text/csv"
                          else await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdminCallFailed(f"admin API at {self._base_url} unreachable: {exc!r}"
                                  ) from None
        if resp.status >= 400:
            message = answer.get("error", {}).get("message", "") if isinstance(
                answer, dict) else ""
            request_id = resp.headers.get("x-request-id", "-")
            raise AdminCallFailed(f"{resp.status}: {message} (request {request_id})")
        return answer


def admin_url(cfg: Config, args: argparse.Namespace) -> str:
    return args.admin_url or f"http://{cfg.admin.host}:{cfg.admin.port}"


def admin_key(args: argparse.Namespace, env: dict[str, str]) -> str:
    key = args.admin_key or env.get(ADMIN_KEY_ENV, "")
    if not key:
        raise ConfigError(f"no admin key: set {ADMIN_KEY_ENV} (or pass --admin-key)")
    return key


async def run_admin(cfg: Config, args: argparse.Namespace, out: TextIO,
                    env: dict[str, str] | None = None) -> int:
    """Runs one admin command; prints the answer as JSON."""
    key = admin_key(args, dict(os.environ) if env is None else env)
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as session:
        client = AdminClient(session, admin_url(cfg, args), key)
        if args.command == "tenants" and args.action == "update":
            answer = await _update_tenant(client, args)
        else:
            answer = await client.call(*_request(args))
    out.write(answer if isinstance(answer, str) else json.dumps(answer, indent=2) + "\n")
    return 0


async def _update_tenant(client: AdminClient, args: argparse.Namespace) -> Any:
    """Limits given by flag change; the tenant's other limits stay as they are
    (read first: two operators updating one tenant at once may overwrite
    each other's limits, as with any read-then-write)."""
    path = f"{PREFIX}/tenants/{args.tenant_id}"
    body: dict[str, Any] = {}
    if args.models is not None:
        body["models"] = args.models
    current = await client.call("GET", path)
    limits = _limits(args, current["limits"])
    if limits is not None:
        body["limits"] = limits
    if not body:
        raise ConfigError("nothing to change: give a limit flag or --model")
    return await client.call("PATCH", path, body)


async def bootstrap_admin_key(cfg: Config, name: str, out: TextIO) -> int:
    """Issues a platform admin key straight into the store (audited, actor
    `system`) and prints it: the only time its plaintext exists."""
    from actors.control_plane import ControlPlane
    from actors.control_store import connect_redis

    if not cfg.auth.key_secret:
        raise ConfigError("the key secret is unknown: pass the running stack's config (`up` "
                          "writes var/run/config.json) or set SWITCHYARD_KEY_SECRET")
    redis = connect_redis(cfg.redis)
    try:
        plane = ControlPlane(redis, cfg.auth, None)
        issued = await plane.bootstrap_platform_key("cli-" + secrets.token_hex(8), name=name)
    finally:
        await redis.aclose()
    out.write(f"{issued.plaintext}\n")
    return 0
