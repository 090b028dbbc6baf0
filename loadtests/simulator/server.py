"""The HTTP face of one replica: vLLM's OpenAI routes plus /sim/ ground truth."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loadtests.simulator.engine import MAX_MODEL_LEN_TOKENS
from loadtests.simulator.protocol import (
    ParsedRequest,
    SimApiError,
    StreamMode,
    parse_chat,
    parse_completion,
)
from loadtests.simulator.replica import Run, SimReplica
from loadtests.simulator.shapes import (
    Body,
    ChatShape,
    CompletionShape,
    ResponseContext,
    ResponseShape,
    usage_body,
)

REPLICA_KEY = web.AppKey("replica", SimReplica)
REQUEST_ID_HEADER = "X-Request-Id"

_encode_json = msgspec.json.Encoder().encode


def create_app(replica: SimReplica) -> web.Application:
    app = web.Application(middlewares=[_vllm_errors])
    app[REPLICA_KEY] = replica
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/load", _load)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sim/requests", _sim_requests)
    app.router.add_get("/sim/requests/{request_id}", _sim_request)
    return app


@web.middleware
async def _vllm_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimApiError as exc:
        return _json(exc.body(), status=exc.status)


def _json(body: object, *, status: int = 200) -> web.Response:
    return web.Response(body=_encode_json(body), status=status, content_type="application/json")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, ChatShape(), parse_chat)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CompletionShape(), parse_completion)


async def _generate(
    request: web.Request,
    shape: ResponseShape,
    parse: Callable[[bytes, str], ParsedRequest],
) -> web.StreamResponse:
    replica = request.app[REPLICA_KEY]
    parsed = parse(await request.read(), replica.model)
    base_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    ctx = ResponseContext(shape.id_prefix + base_id, int(time.time()), replica.model)
    headers = {REQUEST_ID_HEADER: base_id}
    async with replica.generate(base_id, parsed.prompt_ids, parsed.limits) as run:
        if parsed.mode.stream:
            return await _stream(request, headers, shape, ctx, run, parsed.mode)
        pieces: list[str] = []
        while (token := await run.next_token()) is not None:
            pieces.append(token.text)
        usage = usage_body(run.prompt_tokens, run.completion_tokens, run.cached_tokens)
        # The loop ends only once the run has finished.
        finish_reason = run.finish_reason or "abort"
        response = _json(shape.full_response(ctx, "".join(pieces), finish_reason, usage))
        response.headers.update(headers)
        return response


async def _stream(
    request: web.Request,
    headers: dict[str, str],
    shape: ResponseShape,
    ctx: ResponseContext,
    run: Run,
    mode: StreamMode,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
    await response.prepare(request)
    try:
        while (token := await run.next_token()) is not None:
            if token.index == 0:
                for chunk in shape.opening_chunks(ctx, _chunk_usage(run, mode, 0)):
                    await _write_event(response, chunk)
            usage = _chunk_usage(run, mode, run.completion_tokens)
            chunk = shape.token_chunk(ctx, token.text, token.finish_reason, usage)
            await _write_event(response, chunk)
        if mode.include_usage:
            usage = usage_body(run.prompt_tokens, run.completion_tokens, run.cached_tokens)
            await _write_event(response, shape.usage_chunk(ctx, usage))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        # The client left between tokens; leaving the run's context records the abort.
        pass
    return response


def _chunk_usage(run: Run, mode: StreamMode, completion_tokens: int) -> Body | None:
    # Per-chunk usage has no prompt_tokens_details in vLLM; the final usage chunk has.
    if not mode.continuous_usage:
        return None
    return usage_body(run.prompt_tokens, completion_tokens, None)


async def _write_event(response: web.StreamResponse, chunk: Body) -> None:
    await response.write(b"data: " + _encode_json(chunk) + b"\n\n")


async def _models(request: web.Request) -> web.Response:
    model = request.app[REPLICA_KEY].model
    created_s = int(time.time())
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}",
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
        "id": model,
        "object": "model",
        "created": created_s,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": MAX_MODEL_LEN_TOKENS,
        "permission": [permission],
    }
    return _json({"object": "list", "data": [card]})


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _load(request: web.Request) -> web.Response:
    return _json({"server_load": request.app[REPLICA_KEY].server_load()})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REPLICA_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _sim_requests(request: web.Request) -> web.Response:
    return _json({"request_ids": request.app[REPLICA_KEY].ledger.request_ids()})


async def _sim_request(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    record = request.app[REPLICA_KEY].ledger.get(request_id)
    if record is None:
        raise SimApiError(f"Unknown request `{request_id}`", status=404, err_type="NotFoundError")
    return _json(record)
