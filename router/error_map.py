"""The one place where errors become responses: an aiohttp middleware for
HTTP (also counting every answer in /metrics), the SSE error event for a
stream that already started, and the NATS API error reply."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import msgspec
from aiohttp import web

from router.metrics import Metrics
from scheduler.errors import (
    BodyTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    RouteNotFound,
    YardError,
)
from scheduler.wire import ApiError, encode

log = logging.getLogger("switchyard.ingress")

METRICS = web.AppKey("metrics", Metrics)
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = web.RequestKey("request_id", str)


def as_yard_error(exc: BaseException) -> YardError:
    """Maps any exception raised while serving to the error tree."""
    if isinstance(exc, YardError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return BodyTooLarge("Request body too large.")
    if isinstance(exc, web.HTTPNotFound):
        return RouteNotFound("Not found.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"Method not allowed; use {', '.join(exc.allowed_methods)}.")
    if isinstance(exc, web.HTTPClientError):
        return InvalidRequest(exc.reason)
    log.error("unexpected error", exc_info=exc)
    return InternalError("The server had an error while processing your request.")


def error_response(exc: YardError, request_id: str | None) -> web.Response:
    headers = exc.headers()
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return web.Response(status=exc.status, body=exc.payload(),
                        content_type="application/json", headers=headers)


def sse_error_event(exc: BaseException) -> bytes:
    """The terminal event of a stream that fails after its first byte
    (no `[DONE]` follows it, so clients see the stream did not complete)."""
    return b"data: " + as_yard_error(exc).payload() + b"\n\n"


def nats_error_reply(exc: BaseException) -> bytes:
    """The same error object as over HTTP (a replica's own, when it refused),
    with its retry-after and its headers (x-ratelimit-*)."""
    err = as_yard_error(exc)
    error = msgspec.json.decode(err.payload()).get("error", err.body()["error"])
    return encode(ApiError(status=err.status, error=error, retry_after_s=err.retry_after_s,
                           headers=err.headers()))


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    started_s = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
        response = error_response(as_yard_error(exc), request.get(REQUEST_ID))
        status = response.status
        return response
    finally:
        metrics = request.app[METRICS]
        route = _route_label(request)
        metrics.labeled(metrics.requests, route, str(status)).inc()
        metrics.labeled(metrics.request_duration, route).observe(time.monotonic() - started_s)
