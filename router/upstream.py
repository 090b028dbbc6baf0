"""The call to the chosen replica: one pooled aiohttp session, SSE relayed
event by event without buffering, usage picked out of the chunks in passing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import msgspec

from scheduler.errors import UpstreamFailed, UpstreamRejected, YardError

ROUTE_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Status recorded when the client went away before the answer was complete.
CLIENT_CLOSED = 499
MAX_NONSTREAM_BODY_BYTES = 64 << 20
DONE = b"[DONE]"


class PromptDetails(msgspec.Struct, frozen=True):
    cached_tokens: int | None = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptDetails | None = None

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details
        return (details.cached_tokens or 0) if details else 0


class _Probe(msgspec.Struct, frozen=True):
    """The only parts of a chunk or response the ingress reads."""

    choices: list[msgspec.Raw] = []
    usage: Usage | None = None


_probe = msgspec.json.Decoder(_Probe)


@dataclass
class CallRecord:
    """What the call observed, for metering."""

    first_byte_at_s: float | None = None
    usage: Usage | None = None
    content_chunks: int = 0
    # Set when a stream fails after its first byte (no HTTP error possible then).
    failure: YardError | None = None
    client_gone: bool = False

    def outcome(self, http_status: int) -> tuple[int, str]:
        """(status, error code) to record for metering."""
        if self.client_gone:
            return CLIENT_CLOSED, "client_closed"
        if self.failure is not None:
            return self.failure.status, self.failure.code or ""
        return http_status, ""


class ReplicaClient:
    def __init__(self, connect_timeout_s: float, total_timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=total_timeout_s, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              auto_decompress=False)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def call(self, url: str, route: str, body: bytes, request_id: str,
             replica_id: str) -> UpstreamCall:
        assert self._session is not None, "ReplicaClient.start() not awaited"
        return UpstreamCall(self._session, url + ROUTE_PATHS[route], body, request_id, replica_id)


class UpstreamCall:
    """`open` sends the request, `close` ends it; closing after a failure
    (client gone, cancellation) drops the connection, which makes the
    replica abort."""

    def __init__(self, session: aiohttp.ClientSession, url: str, body: bytes,
                 request_id: str, replica_id: str) -> None:
        self._session = session
        self._url = url
        self._body = body
        self._headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        self.replica_id = replica_id
        self.record = CallRecord()
        self._resp: aiohttp.ClientResponse | None = None
        self._events: AsyncIterator[bytes] | None = None

    async def open(self) -> None:
        """Sends the request; a connect failure or an error status raises."""
        try:
            self._resp = await self._session.post(self._url, data=self._body, headers=self._headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(f"replica {self.replica_id} unreachable: {exc!r}",
                                 replica_id=self.replica_id) from None
        if self._resp.status >= 400:
            body = await self._read_all()
            self._resp.release()
            if self._resp.status < 500:
                raise UpstreamRejected(self._resp.status, body, replica_id=self.replica_id)
            raise UpstreamFailed(f"replica {self.replica_id} answered {self._resp.status}",
                                 replica_id=self.replica_id)

    def close(self, failed: bool) -> None:
        if self._resp is not None:
            if failed:
                self._resp.close()
            else:
                self._resp.release()

    async def _read_all(self) -> bytes:
        assert self._resp is not None
        try:
            return await self._resp.content.read(MAX_NONSTREAM_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(f"replica {self.replica_id} failed mid-answer: {exc!r}",
                                 replica_id=self.replica_id) from None

    async def read_body(self) -> bytes:
        """The whole non-streaming answer, verbatim; usage recorded."""
        body = await self._read_all()
        self.record.first_byte_at_s = time.monotonic()
        try:
            self.record.usage = _probe.decode(body).usage
        except msgspec.DecodeError:
            raise UpstreamFailed(f"replica {self.replica_id} sent a malformed answer",
                                 replica_id=self.replica_id) from None
        return body

    async def first_event(self, keep_usage_chunk: bool) -> bytes:
        """Starts reading the stream: its first payload (DONE if it has none);
        `rest` yields the others."""
        self._events = self.events(keep_usage_chunk)
        return await anext(self._events, DONE)

    def rest(self) -> AsyncIterator[bytes]:
        assert self._events is not None, "first_event() not awaited"
        return self._events

    async def events(self, keep_usage_chunk: bool) -> AsyncIterator[bytes]:
        """Yields each SSE data payload (JSON bytes) as it arrives, then DONE.
        The usage-only final chunk is dropped unless `keep_usage_chunk`."""
        assert self._resp is not None
        try:
            async for line in self._resp.content:
                payload = line.strip()
                if not payload.startswith(b"data:"):
                    continue
                payload = payload[5:].lstrip()
                if payload == DONE:
                    yield DONE
                    return
                if self._note_chunk(payload) or keep_usage_chunk:
                    yield payload
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamFailed(f"replica {self.replica_id} failed mid-stream: {exc!r}",
                                 replica_id=self.replica_id) from None
        raise UpstreamFailed(f"replica {self.replica_id} ended the stream without [DONE]",
                             replica_id=self.replica_id)

    def _note_chunk(self, payload: bytes) -> bool:
        """Records timing and usage; False for a usage-only chunk."""
        try:
            probe = _probe.decode(payload)
        except msgspec.DecodeError:
            raise UpstreamFailed(f"replica {self.replica_id} sent a malformed chunk",
                                 replica_id=self.replica_id) from None
        if probe.usage is not None:
            self.record.usage = probe.usage
        if probe.choices:
            if self.record.first_byte_at_s is None:
                self.record.first_byte_at_s = time.monotonic()
            self.record.content_chunks += 1
            return True
        return probe.usage is None
