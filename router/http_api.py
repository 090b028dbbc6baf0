"""HTTP/SSE front end: the OpenAI routes, health and metrics."""

from __future__ import annotations

import os
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router.auth import refuse_query_credentials
from router.error_map import METRICS, REQUEST_ID, REQUEST_ID_HEADER, sse_error_event
from router.gateway import SESSION_HEADER, Gateway, RequestContext, new_request_id
from router.upstream import CLIENT_CLOSED, DONE
from scheduler.errors import YardError
from scheduler.priority import PRIORITY_HEADER

GATEWAY = web.AppKey("gateway", Gateway)
READINESS = web.AppKey("readiness", object)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# Switchyard's own time for the request, in ms, until its response headers:
# the time since its body was read minus the time spent waiting for replicas
# (their response headers and every read of their answer, failed attempts
# included). Non-streaming: everything but the replica's answer (auth,
# validation, quota, placement round trip, connecting and sending upstream,
# assembling the answer). Streaming: the same until the first event; what
# relaying each later event costs is not in it (the headers left before).
OVERHEAD_HEADER = "x-switchyard-overhead-ms"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def _serve(request: web.Request, route: str) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    request_id = request[REQUEST_ID] = new_request_id()
    body = await request.read()
    ctx = await gateway.admit(request_id, route, body, request.headers.get("Authorization"),
                              request.headers.get(SESSION_HEADER),
                              request.headers.get(PRIORITY_HEADER))
    status, error_code = CLIENT_CLOSED, "client_closed"
    try:
        relay = _relay_stream if ctx.parsed.stream else _relay_body
        # Errors before the first piece are still plain HTTP errors (middleware).
        async with gateway.upstream(ctx) as first:
            response = await relay(request, ctx, first)
        status, error_code = ctx.call.record.outcome(response.status)
        return response
    except YardError as exc:
        status, error_code = exc.status, exc.code or ""
        raise
    finally:
        gateway.finish(ctx, status, error_code)


def _headers(request: web.Request, ctx: RequestContext) -> dict[str, str]:
    overhead_s = (time.monotonic() - ctx.started_at_s - ctx.upstream_wait_s
                  - ctx.call.record.upstream_wait_s)
    metrics = request.app[METRICS]
    metrics.labeled(metrics.overhead, ctx.parsed.route, _STREAM_LABEL[ctx.parsed.stream]
                    ).observe(overhead_s)
    return {REQUEST_ID_HEADER: ctx.request_id, "x-switchyard-replica": ctx.placement.replica_id,
            OVERHEAD_HEADER: f"{overhead_s * 1000:.3f}",
            **(ctx.admission.headers() if ctx.admission is not None else {})}


_STREAM_LABEL = {True: "true", False: "false"}


async def _relay_body(request: web.Request, ctx: RequestContext,
                      body: bytes) -> web.StreamResponse:
    response = web.Response(body=body, content_type="application/json",
                            headers=_headers(request, ctx))
    # Sent here, not after the handler returns, so the outcome is known when
    # `finish` records it.
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        ctx.call.record.client_gone = True
    return response


async def _relay_stream(request: web.Request, ctx: RequestContext,
                        first: bytes) -> web.StreamResponse:
    call = ctx.call
    response = web.StreamResponse(headers={**SSE_HEADERS, **_headers(request, ctx)})
    await response.prepare(request)
    try:
        await response.write(b"data: " + first + b"\n\n")
        if first != DONE:
            # The events of one read from the replica in one write; the write
            # waits while the client's socket is full (back-pressure).
            async for batch in call.rest_batches():
                await response.write(b"data: " + b"\n\ndata: ".join(batch) + b"\n\n")
        await response.write_eof()
    except YardError as exc:
        call.record.failure = exc
        await response.write(sse_error_event(exc))
    except ConnectionResetError:
        call.record.client_gone = True
    return response


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await gateway.authenticate(request.headers.get("Authorization"))
    cards = await gateway.models(principal)
    created_s = int(time.time())
    data = [{"id": c.id, "object": "model", "created": created_s, "owned_by": "switchyard"}
            for c in cards]
    return web.json_response({"object": "list", "data": data})


@web.middleware
async def query_credentials_guard(request: web.Request,
                                  handler: web.Handler) -> web.StreamResponse:
    """A key in the URL is refused (401) before any handler sees it."""
    refuse_query_credentials(request.query)
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    # The worker that answered, among the processes sharing the port.
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    problems = await request.app[READINESS]()  # type: ignore[operator]
    status = 503 if problems else 200
    return web.json_response({"ready": not problems, "problems": problems}, status=status)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
