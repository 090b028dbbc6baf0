"""The upstream connection pool: a stream read to its [DONE] gives its
connection back for the next call (the body's last chunk is read too; a
response released before it would close the connection), streaming or
assembled; a replica that does not end its body after [DONE] costs the
call at most AFTER_DONE_WAIT_S, and only that connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from deploy.procs import free_port
from router.upstream import AFTER_DONE_WAIT_S, DONE, ReplicaClient

pytestmark = pytest.mark.integration
CHUNK = (b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"length"}],'
         b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}')


class Replica:
    """Answers every call with one chunk and [DONE]; counts its connections."""

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        # Leave the body open after [DONE] (a misbehaving replica).
        self.hang_after_done = False

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + CHUNK + b"\n\ndata: [DONE]\n\n")
        # The body's last chunk comes a moment after [DONE], as it may from vLLM.
        await asyncio.sleep(AFTER_DONE_WAIT_S * 4 if self.hang_after_done else 0.02)
        await response.write_eof()
        return response


@pytest_asyncio.fixture
async def replica() -> AsyncIterator[tuple[Replica, str]]:
    stand_in = Replica()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stand_in.chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield stand_in, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[ReplicaClient]:
    replicas = ReplicaClient(connect_timeout_s=1.0, total_timeout_s=10.0)
    await replicas.start()
    yield replicas
    await replicas.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_stream_read_to_done_keeps_its_connection(
        replica: tuple[Replica, str], client: ReplicaClient, stream: bool) -> None:
    stand_in, url = replica
    for i in range(5):
        call = client.call(url, "chat", b"{}", f"req-{i}", "r0")
        await call.open()
        if stream:
            assert await call.first_event(False, False) != DONE
            assert [p async for p in call.rest()] == [DONE]
        else:
            assert b'"content":"hi"' in await call.read_body(assembled=True)
        call.close(failed=False)
    assert len(stand_in.peers) == 1


async def test_a_body_left_open_after_done_is_given_up_on(
        replica: tuple[Replica, str], client: ReplicaClient) -> None:
    stand_in, url = replica
    stand_in.hang_after_done = True
    started_s = time.monotonic()
    call = client.call(url, "chat", b"{}", "req-1", "r0")
    await call.open()
    assert b'"content":"hi"' in await call.read_body(assembled=True)
    call.close(failed=False)
    assert time.monotonic() - started_s < AFTER_DONE_WAIT_S * 3
    # Its connection is not reused: the next call opens another.
    stand_in.hang_after_done = False
    call = client.call(url, "chat", b"{}", "req-2", "r0")
    await call.open()
    await call.read_body(assembled=True)
    call.close(failed=False)
    assert len(stand_in.peers) == 2
