"""Assembles one ingress process: its connections and long-lived parts are
created in a cleanup context (so they start with the app and close with it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
from aiohttp import web
from redis.asyncio import Redis

from actors.bus import connect_bus
from actors.control_plane import ControlPlane
from actors.control_store import ReplicaRegistry, connect_redis
from router.auth import Authenticator
from router.error_map import METRICS, error_middleware
from router.fallback import FallbackPlacer
from router.gateway import Gateway, reads_block_hashes
from router.http_api import GATEWAY, READINESS, add_routes, query_credentials_guard
from router.log_redaction import quote_no_requests
from router.metrics import Metrics
from router.nats_api import NatsApi
from router.outbox import Outbox
from router.placer import Placer
from router.prices import PriceBook
from router.prompt_blocks import PromptHasher
from router.quota_client import QuotaClient
from router.spool import UsageSpool, spool_path
from router.upstream import ReplicaClient
from scheduler.config import Config
from scheduler.errors import ConfigError
from scheduler.wire import CONTROL_CHANGED_SUBJECT

# aiohttp's default header limit (8190 bytes per line) is kept; the body
# limit comes from the config.


def create_app(cfg: Config, metrics_dir: Path | None = None) -> web.Application:
    """`metrics_dir`: the shared metrics directory of a port's workers."""
    if not cfg.auth.key_secret:
        raise ConfigError("auth.key_secret (or SWITCHYARD_KEY_SECRET) must be set")
    quote_no_requests()
    app = web.Application(client_max_size=cfg.ingress.max_body_bytes,
                          middlewares=[error_middleware, query_credentials_guard])
    app[METRICS] = Metrics(metrics_dir)
    app.cleanup_ctx.append(_services(cfg))
    add_routes(app)
    return app


def _services(cfg: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def services(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        # First: a model's tokenizer that cannot be loaded stops the start before anything runs.
        hasher = None
        if reads_block_hashes(cfg):
            hasher = PromptHasher(cfg.models, cfg.ingress.tokenizer_threads,
                                  cfg.ingress.tokenize_inline_max_bytes, metrics.prompt_hashing)
            await hasher.start()
        redis = connect_redis(cfg.redis)
        # The ingress only reads the control plane: it publishes nothing.
        auth = Authenticator(ControlPlane(redis, cfg.auth, publish=None),
                             cfg.auth.key_secret.encode(), cfg.ingress.key_cache_ttl_s)
        nc = await connect_bus(cfg.nats, "switchyard-ingress", reconnected=auth.on_reconnected)
        replicas = ReplicaClient(cfg.ingress.upstream_connect_timeout_s,
                                 cfg.ingress.upstream_total_timeout_s)
        await replicas.start()
        spool = UsageSpool(spool_path(cfg), cfg.ingress.spool_max_events, metrics)
        await spool.start()
        outbox = Outbox(nc, cfg.ingress.usage_queue_size, cfg.nats.request_timeout_s, metrics,
                        spool)
        await outbox.start()
        control_sub = await nc.subscribe(CONTROL_CHANGED_SUBJECT, cb=auth.on_control_changed)
        quota = QuotaClient(nc, cfg.quota, metrics=metrics)
        await quota.start()
        quota_sub = await nc.subscribe(CONTROL_CHANGED_SUBJECT, cb=quota.on_control_changed)
        prices = PriceBook(redis, cfg.quota.cache_ttl_s, ReplicaRegistry(redis))
        prices_sub = await nc.subscribe(CONTROL_CHANGED_SUBJECT, cb=prices.on_control_changed)
        placer = Placer(nc, cfg.ingress.placement_timeout_s,
                        cfg.ingress.placement_attempt_timeout_s, metrics)
        await placer.start()
        fallback = None
        if cfg.ingress.fallback_placement:
            fallback = FallbackPlacer(cfg, ReplicaRegistry(redis), metrics)
            await fallback.start()
        gateway = Gateway(cfg, auth, nc, placer, replicas, outbox, metrics, hasher, quota,
                          prices, fallback)
        nats_api = NatsApi(nc, gateway)
        await nats_api.start()
        app[GATEWAY] = gateway
        app[READINESS] = _readiness(nc, redis, cfg.redis.timeout_s)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await control_sub.unsubscribe()
                await quota_sub.unsubscribe()
                await prices_sub.unsubscribe()
            await nats_api.aclose()
            # After the requests: their settlements go with the lease returns.
            await quota.aclose()
            await placer.aclose()
            if fallback is not None:
                await fallback.aclose()
            await outbox.aclose()
            await spool.aclose()
            await replicas.aclose()
            if hasher is not None:
                hasher.aclose()
            with contextlib.suppress(Exception):
                await nc.drain()
            await redis.aclose()

    return services


def _readiness(nc: nats.NATS, redis: Redis,
               timeout_s: float) -> Callable[[], Awaitable[list[str]]]:
    async def problems() -> list[str]:
        found = []
        if not nc.is_connected:
            found.append("nats: not connected")
        try:
            await asyncio.wait_for(redis.ping(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            found.append(f"redis: {type(exc).__name__}")
        return found

    return problems
