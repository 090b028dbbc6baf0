"""The admin API server (`python -m router.admin_main`): its own process, on
its own port, so several ingress workers do not each serve it.

Every request passes the error middleware (router/error_map.py: errors
become OpenAI-shaped bodies), then the admin guard, which gives it an id
(returned in `x-request-id`, kept by the audit entry of the mutation it
makes) and refuses, in order: a key in the URL (401); a route without a row
in the operation table (scheduler/admin_api.py; 403, deny by default); for
a row with an action, a missing or invalid key (401), a role that may not
perform it (403), and another tenant's records unless the key is a platform
admin's (404).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from actors.bus import connect_bus
from actors.control_plane import ControlPlane
from actors.control_store import connect_redis
from actors.control_tx import nats_publisher
from analytics.metering_client import MeteringClient
from router.admin_handlers import HANDLERS, Call, Handler, decode_body
from router.auth import Authenticator, refuse_query_credentials
from router.billing_handlers import BILLING_HANDLERS
from router.dashboard import VENDOR_DIR, dashboard_handlers
from router.error_map import METRICS, REQUEST_ID, REQUEST_ID_HEADER, error_middleware
from router.log_redaction import quote_no_requests
from router.metrics import Metrics
from scheduler.access import authorize
from scheduler.admin_api import BY_ROUTE, OPERATIONS, CsvExport, Operation
from scheduler.config import Config
from scheduler.control import Actor
from scheduler.errors import ConfigError, InvalidRequest, PermissionDenied, ServiceUnavailable

MAX_BODY_BYTES = 64 * 1024
# Admin calls are rare and a revoked admin key must stop at once: every
# call reads the key from Redis (no cached copies to evict).
KEY_CACHE_TTL_S = 0.0


@dataclass(frozen=True, slots=True)
class AdminServices:
    plane: ControlPlane
    redis: aioredis.Redis
    auth: Authenticator
    metering: MeteringClient


SERVICES = web.AppKey("admin_services", AdminServices)
ACTOR = web.RequestKey("admin_actor", Actor)


def create_admin_app(cfg: Config, vendor_dir: Path = VENDOR_DIR) -> web.Application:
    """`vendor_dir`: the dashboard's charting library (router/dashboard.py)."""
    if not cfg.auth.key_secret:
        raise ConfigError("auth.key_secret (or SWITCHYARD_KEY_SECRET) must be set")
    quote_no_requests()
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[error_middleware, admin_guard])
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_services_of(cfg))
    handlers = {**HANDLERS, **BILLING_HANDLERS, **dashboard_handlers(vendor_dir)}
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, _endpoint(op, handlers[op.operation_id]))
    return app


def _services_of(cfg: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def services(app: web.Application) -> AsyncIterator[None]:
        nc = await connect_bus(cfg.nats, "switchyard-admin")
        redis = connect_redis(cfg.redis)
        plane = ControlPlane(redis, cfg.auth, nats_publisher(nc))
        auth = Authenticator(plane, cfg.auth.key_secret.encode(), KEY_CACHE_TTL_S)
        app[SERVICES] = AdminServices(plane=plane, redis=redis, auth=auth,
                                      metering=MeteringClient(nc))
        try:
            yield
        finally:
            await redis.aclose()
            with contextlib.suppress(Exception):
                await nc.drain()
    return services


def operation_of(request: web.Request) -> Operation | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return BY_ROUTE.get((request.method, resource.canonical))


@web.middleware
async def admin_guard(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    request_id = "adm-" + secrets.token_hex(12)
    request[REQUEST_ID] = request_id
    refuse_query_credentials(request.query)
    # Unknown paths and methods fall through to aiohttp's 404/405.
    if request.match_info.http_exception is None:
        op = operation_of(request)
        if op is None:
            raise PermissionDenied("This route is not an admin API operation.")
        if op.action is not None:
            request[ACTOR] = await _authorized_actor(request, op)
    response = await handler(request)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


async def _authorized_actor(request: web.Request, op: Operation) -> Actor:
    assert op.action is not None
    principal = await request.app[SERVICES].auth.authenticate(
        request.headers.get("Authorization"))
    if principal.tenant is not None and principal.tenant.status != "active":
        raise PermissionDenied("This key's tenant is suspended.",
                               tenant_id=principal.tenant_id)
    actor = Actor(key_id=principal.key_id, tenant_id=principal.tenant_id, role=principal.role)
    authorize(actor, op.action, _tenant_named(request, op))
    return actor


def _tenant_named(request: web.Request, op: Operation) -> str | None:
    """The tenant the call is about, when it names one: in its path, or in a
    query parameter it declares (the audit listing's filter). A key's tenant
    is known only once the key is read: the control plane checks it."""
    if "tenant_id" in request.match_info:
        return request.match_info["tenant_id"]
    if any(param.name == "tenant_id" for param in op.query):
        return request.query.get("tenant_id")
    return None


def _endpoint(op: Operation, handler: Handler) -> web.Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        raw = await request.read()
        if op.body is not None and raw.strip() and request.content_type != "application/json":
            raise InvalidRequest("Send the body as `Content-Type: application/json`.")
        call = Call(plane=services.plane, redis=services.redis, metering=services.metering,
                    actor=request.get(ACTOR),
                    request_id=request[REQUEST_ID], path=request.match_info,
                    query=request.query, body=decode_body(op, raw))
        try:
            result = await handler(call)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ServiceUnavailable(f"control store unreachable: {type(exc).__name__}",
                                     retry_after_s=1.0) from None
        if isinstance(result, web.FileResponse):
            return result
        if isinstance(result, CsvExport):
            return web.Response(status=op.status, text=result.text, content_type="text/csv",
                                headers={"Content-Disposition":
                                         f'attachment; filename="{result.filename}"'})
        return web.Response(status=op.status, body=msgspec.json.encode(result),
                            content_type="application/json")
    return serve
