"""T35 ssrf_and_isolation, media URLs: chat messages whose content points a
replica at a canary listener on loopback, at the metadata address or at a
file are refused (400, naming the field) over HTTP and NATS, before any
replica sees them; the canary sees 0 connections. An inline data: URL passes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from deploy.procs import LOOPBACK
from scheduler.wire import API_SUBJECTS, ApiError, ApiResponse, api_reply_decoder
from tests.harness import MODEL, Switchyard, nats_client

pytestmark = pytest.mark.integration
PNG = "data:image/png;base64,iVBORw0KGgo="


class Canary:
    """A loopback listener that counts every connection made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._seen, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _seen(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest_asyncio.fixture
async def canary() -> AsyncIterator[Canary]:
    listener = Canary()
    await listener.start()
    yield listener
    await listener.aclose()


def _bodies(port: int) -> list[tuple[dict[str, Any], str]]:
    """Requests pointing a replica elsewhere, with the field each is refused for."""
    local = f"http://{LOOPBACK}:{port}/canary.png"
    forms = [local, f"http://localhost:{port}/a", f"http://2130706433:{port}/a",
             f"http://0x7f.1:{port}/a", f"http://[::ffff:127.0.0.1]:{port}/a",
             "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"]
    out = []
    for url in forms:
        out.append(({"type": "image_url", "image_url": {"url": url}},
                    "messages[0].content[1].image_url.url"))
    out += [({"type": "audio_url", "audio_url": {"url": local}},
             "messages[0].content[1].audio_url.url"),
            ({"type": "video_url", "video_url": {"url": local}},
             "messages[0].content[1].video_url.url"),
            ({"type": "text", "text": "x", "uuid": "u", "image_url": local},
             "messages[0].content[1].image_url")]
    return out


def _chat(part: dict[str, Any]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}


def _served(yard: Switchyard) -> int:
    assert yard.fleet is not None
    return sum(len(r.ledger.request_ids()) for r in yard.fleet.replicas)


async def test_media_urls_to_internal_addresses_never_reach_a_replica(
        switchyard: Switchyard, canary: Canary) -> None:
    cases = _bodies(canary.port)
    served_before = _served(switchyard)
    headers = {"Authorization": f"Bearer {switchyard.api_key}"}
    async with nats_client(switchyard.cfg.nats.url) as nc:
        async with aiohttp.ClientSession() as http:
            for part, field in cases:
                async with http.post(switchyard.base_url + "/chat/completions",
                                     json=_chat(part), headers=headers) as resp:
                    error = (await resp.json())["error"]
                    assert resp.status == 400, error
                    assert (error["type"], error["param"]) == ("invalid_request_error", field)
                    assert field in error["message"]
                msg = await nc.request(next(iter(API_SUBJECTS)), msgspec.json.encode(_chat(part)),
                                       timeout=5, headers=headers)
                reply = api_reply_decoder.decode(msg.data)
                assert isinstance(reply, ApiError) and reply.status == 400
                assert reply.error["param"] == field
            assert _served(switchyard) == served_before
            async with http.post(switchyard.base_url + "/chat/completions", headers=headers,
                                 json=_chat({"type": "image_url",
                                             "image_url": {"url": PNG}})) as resp:
                assert resp.status == 200, await resp.text()
        msg = await nc.request(next(iter(API_SUBJECTS)),
                               msgspec.json.encode(_chat({"type": "image_url",
                                                          "image_url": {"url": PNG}})),
                               timeout=5, headers=headers)
        assert isinstance(api_reply_decoder.decode(msg.data), ApiResponse)
    assert canary.connections == 0
