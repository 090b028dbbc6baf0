"""The NATS subject API for internal services.

A request on `yard.v1.chat.completions` or `yard.v1.completions` carries the
OpenAI JSON body and an `Authorization: Bearer <key>` header, with a reply
inbox. Replies (JSON, tagged by "kind", see scheduler/wire/): a non-streaming
request gets one `response` (or `error`); a streaming one gets `chunk`
messages and then one `end` (or an `error`, which also ends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from router.error_map import nats_error_reply
from router.gateway import SESSION_HEADER, Gateway, new_request_id
from router.upstream import CLIENT_CLOSED, DONE, UpstreamCall
from scheduler.errors import NoCapacity, YardError
from scheduler.priority import PRIORITY_HEADER
from scheduler.wire import API_QUEUE, API_SUBJECTS, ApiChunk, ApiEnd, ApiResponse, encode

log = logging.getLogger("switchyard.nats_api")
MAX_CONCURRENT = 1_000


class NatsApi:
    def __init__(self, nc: NATS, gateway: Gateway) -> None:
        self._nc = nc
        self._gateway = gateway
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for subject, route in API_SUBJECTS.items():
            self._subs.append(await self._nc.subscribe(
                subject, queue=API_QUEUE, cb=self._dispatcher(route)))

    async def aclose(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _dispatcher(self, route: str):
        async def dispatch(msg: Msg) -> None:
            if not msg.reply:
                return  # nowhere to answer
            if len(self._tasks) >= MAX_CONCURRENT:
                await msg.respond(nats_error_reply(NoCapacity("Too many NATS API requests.",
                                                              retry_after_s=1.0)))
                return
            task = asyncio.create_task(self._serve(route, msg), name="nats-api-request")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return dispatch

    async def _serve(self, route: str, msg: Msg) -> None:
        try:
            await self._answer(route, msg)
        except Exception as exc:  # noqa: BLE001 - the caller always gets an answer
            await self._reply(msg, nats_error_reply(exc))

    async def _answer(self, route: str, msg: Msg) -> None:
        headers = msg.headers or {}
        ctx = await self._gateway.admit(new_request_id(), route, msg.data,
                                        headers.get("Authorization"), headers.get(SESSION_HEADER),
                                        headers.get(PRIORITY_HEADER))
        status, error_code = CLIENT_CLOSED, "client_closed"
        try:
            # Errors before the first piece are error replies; the gateway retried them.
            async with self._gateway.upstream(ctx) as first:
                if ctx.parsed.stream:
                    await self._stream(msg, ctx.call, first)
                else:
                    await self._reply(msg, encode(ApiResponse(data=msgspec.Raw(first))))
            status, error_code = ctx.call.record.outcome(200)
        except YardError as exc:
            status, error_code = exc.status, exc.code or ""
            raise
        finally:
            self._gateway.finish(ctx, status, error_code)

    async def _stream(self, msg: Msg, call: UpstreamCall, first: bytes) -> None:
        if first != DONE:
            try:
                await self._reply(msg, encode(ApiChunk(data=msgspec.Raw(first))))
                async for payload in call.rest():
                    if payload == DONE:
                        break
                    await self._reply(msg, encode(ApiChunk(data=msgspec.Raw(payload))))
            except YardError as exc:
                call.record.failure = exc
                await self._reply(msg, nats_error_reply(exc))
                return
        await self._reply(msg, encode(ApiEnd()))

    async def _reply(self, msg: Msg, payload: bytes) -> None:
        await self._nc.publish(msg.reply, payload)
