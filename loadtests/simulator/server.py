"""The HTTP face of one replica: vLLM's OpenAI and server routes, plus /sim/ (admin.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loadtests.simulator.admin import CONTROL_KEY, REPLICA_KEY, ServerControl, add_admin_routes
from loadtests.simulator.faults import error_type
from loadtests.simulator.protocol import ParsedRequest, RequestParser, SimApiError, StreamMode
from loadtests.simulator.replica import Run, SimReplica
from loadtests.simulator.shapes import (
    Body,
    ChatShape,
    CompletionShape,
    ResponseContext,
    ResponseShape,
)

PARSER_KEY = web.AppKey("parser", RequestParser)
REQUEST_ID_HEADER = "X-Request-Id"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"

_encode_json = msgspec.json.Encoder().encode


def create_app(replica: SimReplica, control: ServerControl | None = None) -> web.Application:
    """The replica's app; it starts the replica on startup and closes it on cleanup.
    `control` (its listening server) enables the crash and refuse faults."""
    app = web.Application(middlewares=[_vllm_errors])
    app[REPLICA_KEY] = replica
    app[PARSER_KEY] = RequestParser(replica.model, replica.tokenizer, replica.cfg.max_model_len)
    if control is not None:
        app[CONTROL_KEY] = control
    app.cleanup_ctx.append(_replica_lifetime)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_get("/health", _health)
    app.router.add_get("/load", _load)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/kv_event_sources", _kv_event_sources)
    add_admin_routes(app)
    return app


async def _replica_lifetime(app: web.Application) -> AsyncIterator[None]:
    replica = app[REPLICA_KEY]
    await replica.start()
    yield
    await replica.aclose()


@web.middleware
async def _vllm_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimApiError as exc:
        return _json(exc.body(), status=exc.status)


def _json(body: object, *, status: int = 200) -> web.Response:
    return web.Response(body=_encode_json(body), status=status, content_type="application/json")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, ChatShape(), request.app[PARSER_KEY].chat)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CompletionShape(), request.app[PARSER_KEY].completion)


async def _generate(
    request: web.Request,
    shape: ResponseShape,
    parse: Callable[[bytes], ParsedRequest],
) -> web.StreamResponse:
    replica = request.app[REPLICA_KEY]
    _check_serving(replica)
    parsed = parse(await request.read())
    base_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    ctx = ResponseContext(shape.id_prefix + base_id, int(time.time()), replica.model,
                          replica.system_fingerprint, parsed.mode.include_usage)
    headers = {REQUEST_ID_HEADER: base_id}
    with replica.counting_load():
        async with replica.generate(base_id, parsed.prompt_ids, parsed.limits,
                                    parsed.cache_salt) as run:
            if parsed.mode.stream:
                return await _stream(request, headers, shape, ctx, run, parsed.mode)
            pieces: list[str] = []
            while (token := await run.next_token()) is not None:
                pieces.append(token.text)
            # The loop ends only once the run has finished.
            finish_reason = run.finish_reason or "abort"
            body = shape.full_response(ctx, "".join(pieces), finish_reason, run.usage())
            response = _json(body)
            response.headers.update(headers)
            return response


def _check_serving(replica: SimReplica) -> None:
    """Raises the error a fault asks generation requests to get."""
    if replica.starting():
        raise SimApiError("The model is still loading.", status=503,
                          err_type=error_type(503))
    status = replica.faults.error_status
    if status is not None:
        raise SimApiError(f"Simulated failure ({status})", status=status,
                          err_type=error_type(status))


async def _stream(
    request: web.Request,
    headers: dict[str, str],
    shape: ResponseShape,
    ctx: ResponseContext,
    run: Run,
    mode: StreamMode,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE, **headers})
    await response.prepare(request)
    try:
        while (token := await run.next_token()) is not None:
            usage = run.usage() if mode.continuous_usage else None
            if token.index == 0:
                opening_usage = None if usage is None else run.usage(completion_tokens=0)
                for chunk in shape.opening_chunks(ctx, opening_usage):
                    await _write_event(response, chunk)
            await _write_event(response, shape.token_chunk(ctx, token.text,
                                                           token.finish_reason, usage))
        if mode.include_usage:
            await _write_event(response, shape.usage_chunk(ctx, run.usage()))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        # The client left between tokens; leaving the run's context records the abort.
        pass
    return response


async def _write_event(response: web.StreamResponse, chunk: Body) -> None:
    await response.write(b"data: " + _encode_json(chunk) + b"\n\n")


async def _models(request: web.Request) -> web.Response:
    replica = request.app[REPLICA_KEY]
    created_s = int(time.time())
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex[:16]}",
        "object": "model_permission",
        "created": created_s,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": replica.model,
        "object": "model",
        "created": created_s,
        "owned_by": "vllm",
        # vLLM names the model path it loaded; here the tokenizer's directory.
        "root": str(replica.tokenizer.model_dir),
        "parent": None,
        "max_model_len": replica.cfg.max_model_len,
        "permission": [permission],
    }
    return _json({"object": "list", "data": [card]})


async def _tokenize(request: web.Request) -> web.Response:
    return _json(request.app[PARSER_KEY].tokenize(await request.read()))


async def _health(request: web.Request) -> web.Response:
    # vLLM answers 503 while its engine is not up.
    return web.Response(status=503 if request.app[REPLICA_KEY].starting() else 200)


async def _load(request: web.Request) -> web.Response:
    return _json({"server_load": request.app[REPLICA_KEY].server_load()})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REPLICA_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _kv_event_sources(request: web.Request) -> web.Response:
    # vLLM: the publisher config per data-parallel rank; {} without KV events.
    publisher = request.app[REPLICA_KEY].publisher
    return _json({} if publisher is None else {"0": publisher.source()})
