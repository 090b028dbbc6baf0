"""`switchyard replicas add|drain|remove|list`: the operator's side of the
replica registry in Redis. Every change is announced on NATS so scheduler
actors reload the registry at once (they also reload it periodically)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import aiohttp

from actors.bus import connect_bus
from actors.control_store import ReplicaRegistry, connect_redis
from scheduler.config import Config
from scheduler.errors import ConfigError
from scheduler.wire import REGISTRY_CHANGED_SUBJECT, RegistryChanged, ReplicaInfo, encode

DESCRIBE_TIMEOUT_S = 10.0


def add_parser(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    replicas = sub.add_parser("replicas", help="add, drain, remove or list replicas")
    replicas.add_argument("--config", type=Path, help=config_help)
    action = replicas.add_subparsers(dest="action", required=True)
    add = action.add_parser("add", help="register an OpenAI-compatible server (e.g. vLLM)")
    add.add_argument("url")
    add.add_argument("--id", help="replica id (default: host:port)")
    add.add_argument("--model", action="append", default=[],
                     help="model it serves (repeatable; default: ask its /v1/models)")
    drain = action.add_parser("drain", help="no new requests; in-flight ones finish")
    drain.add_argument("id")
    drain.add_argument("--undo", action="store_true", help="take new requests again")
    remove = action.add_parser("remove", help="unregister (its agent will not re-add it)")
    remove.add_argument("id")
    action.add_parser("list", help="the registered replicas")


async def run_replicas(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    redis = connect_redis(cfg.redis)
    registry = ReplicaRegistry(redis)
    try:
        if args.action == "list":
            for info in await registry.replicas():
                state = "draining" if info.draining else "active"
                out.write(f"{info.id}\t{info.url}\t{','.join(info.models)}\t{state}\n")
            return 0
        if args.action == "add":
            info = await _describe(args.url.rstrip("/"), args.id, tuple(args.model))
            await registry.put_replica(info)
            out.write(f"added {info.id} ({info.url}, {', '.join(info.models)})\n")
        elif args.action == "drain":
            if not await registry.set_draining(args.id, not args.undo):
                raise ConfigError(f"no replica {args.id!r}")
            out.write(f"{args.id}: {'active' if args.undo else 'draining'}\n")
        else:
            if not await registry.retire_replica(args.id):
                raise ConfigError(f"no replica {args.id!r}")
            out.write(f"removed {args.id}\n")
        await _announce(cfg)
        return 0
    finally:
        await redis.aclose()


async def _describe(url: str, replica_id: str | None, models: tuple[str, ...]) -> ReplicaInfo:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"replica URL must be http(s)://host:port, got {url!r}")
    if not models:
        models = await _served_models(url)
    return ReplicaInfo(id=replica_id or f"{parts.hostname}:{parts.port or 80}", url=url,
                       models=models)


async def _served_models(url: str) -> tuple[str, ...]:
    timeout = aiohttp.ClientTimeout(total=DESCRIBE_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url + "/v1/models") as resp:
            resp.raise_for_status()
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"cannot ask {url}/v1/models which models it serves: {exc!r}; "
                          "start it first or name them with --model") from None
    models = tuple(m["id"] for m in body.get("data", []) if isinstance(m, dict) and "id" in m)
    if not models:
        raise ConfigError(f"replica {url} serves no model")
    return models


async def _announce(cfg: Config) -> None:
    nc = await connect_bus(cfg.nats, "switchyard-replicas-cli")
    try:
        await nc.publish(REGISTRY_CHANGED_SUBJECT, encode(RegistryChanged()))
        await asyncio.wait_for(nc.flush(), cfg.nats.request_timeout_s)
    finally:
        await nc.close()
