"""The call to the chosen replica: one pooled aiohttp session, SSE relayed
as it arrives without buffering (the events of one network read together),
usage picked out of the chunks in passing. The time spent waiting for the
replica is counted, so the ingress's own time is known (overhead header)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import msgspec

from router.assemble import Assembler
from scheduler.errors import UpstreamFailed, UpstreamRejected, YardError

ROUTE_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Status recorded when the client went away before the answer was complete.
CLIENT_CLOSED = 499
MAX_NONSTREAM_BODY_BYTES = 64 << 20
DONE = b"[DONE]"
# Read after [DONE] to keep the connection; a replica sending more, or not
# ending its body, is cut off.
MAX_AFTER_DONE_BYTES = 64 << 10
AFTER_DONE_WAIT_S = 0.5


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
    # Time spent awaiting the replica (its response headers, then each read).
    upstream_wait_s: float = 0.0
    # The replica answered 200: its request runs, so it is billed.
    accepted: bool = False
    # The latest usage the replica reported (on every chunk of a stream).
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
        return UpstreamCall(self._session, route, url + ROUTE_PATHS[route], body, request_id,
                            replica_id)


class UpstreamCall:
    """`open` sends the request, `close` ends it; closing after a failure
    (client gone, cancellation) drops the connection, which makes the
    replica abort."""

    def __init__(self, session: aiohttp.ClientSession, route: str, url: str, body: bytes,
                 request_id: str, replica_id: str) -> None:
        self._session = session
        self._route = route
        self._url = url
        self._body = body
        self._headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        self.replica_id = replica_id
        self.record = CallRecord()
        self._resp: aiohttp.ClientResponse | None = None
        self._batches: AsyncIterator[list[bytes]] | None = None
        # The events of the first read that came after the first one.
        self._first_rest: list[bytes] = []
        # A line read but not complete yet.
        self._partial = b""

    async def open(self) -> None:
        """Sends the request; a connect failure or an error status raises."""
        waited_s = time.monotonic()
        try:
            self._resp = await self._session.post(self._url, data=self._body, headers=self._headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(f"replica {self.replica_id} unreachable: {exc!r}",
                                 replica_id=self.replica_id) from None
        finally:
            self.record.upstream_wait_s += time.monotonic() - waited_s
        if self._resp.status >= 400:
            body = await self._read_all()
            self._resp.release()
            if self._resp.status < 500:
                raise UpstreamRejected(self._resp.status, body, replica_id=self.replica_id)
            raise UpstreamFailed(f"replica {self.replica_id} answered {self._resp.status}",
                                 replica_id=self.replica_id)
        self.record.accepted = True

    def close(self, failed: bool) -> None:
        if self._resp is not None:
            if failed:
                self._note_buffered()
                self._resp.close()
            else:
                self._resp.release()

    def _note_buffered(self) -> None:
        """Reads the usage in chunks already received but not relayed: the
        replica counted those tokens."""
        assert self._resp is not None
        try:
            data = self._partial + self._resp.content.read_nowait()
        except (RuntimeError, aiohttp.ClientError):
            return
        for line in data.split(b"\n"):
            payload = line.strip()
            if payload.startswith(b"data:") and payload[5:].lstrip() != DONE:
                try:
                    usage = _probe.decode(payload[5:]).usage
                except msgspec.DecodeError:
                    continue  # a chunk cut in half
                if usage is not None:
                    self.record.usage = usage

    async def _read_all(self) -> bytes:
        assert self._resp is not None
        waited_s = time.monotonic()
        try:
            return await self._resp.content.read(MAX_NONSTREAM_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(f"replica {self.replica_id} failed mid-answer: {exc!r}",
                                 replica_id=self.replica_id) from None
        finally:
            self.record.upstream_wait_s += time.monotonic() - waited_s

    async def read_body(self, assembled: bool) -> bytes:
        """The whole non-streaming answer: verbatim, or `assembled` from the
        stream it was asked as (router/assemble.py); usage recorded."""
        if assembled:
            return await self._assemble()
        body = await self._read_all()
        self.record.first_byte_at_s = time.monotonic()
        try:
            self.record.usage = _probe.decode(body).usage
        except msgspec.DecodeError:
            raise UpstreamFailed(f"replica {self.replica_id} sent a malformed answer",
                                 replica_id=self.replica_id) from None
        return body

    async def _assemble(self) -> bytes:
        assembler = Assembler(self._route)
        async for payload in self.events(keep_usage_chunk=True, keep_chunk_usage=True):
            if payload == DONE:
                continue  # the last one: the stream is read to its end
            try:
                assembler.add(payload)
            except msgspec.DecodeError:
                raise UpstreamFailed(f"replica {self.replica_id} sent a malformed chunk",
                                     replica_id=self.replica_id) from None
        return assembler.body()

    async def first_event(self, keep_usage_chunk: bool, keep_chunk_usage: bool) -> bytes:
        """Starts reading the stream: its first payload (DONE if it has none);
        `rest_batches` yields the others."""
        self._batches = self._read_batches(keep_usage_chunk, keep_chunk_usage)
        batch = await anext(self._batches, [DONE])
        self._first_rest = batch[1:]
        return batch[0]

    async def rest_batches(self) -> AsyncIterator[list[bytes]]:
        """The payloads after the first, a list per network read (the last ends with DONE)."""
        assert self._batches is not None, "first_event() not awaited"
        if self._first_rest:
            yield self._first_rest
        async for batch in self._batches:
            yield batch

    async def rest(self) -> AsyncIterator[bytes]:
        """The payloads after the first, one by one."""
        async for batch in self.rest_batches():
            for payload in batch:
                yield payload

    async def events(self, keep_usage_chunk: bool,
                     keep_chunk_usage: bool) -> AsyncIterator[bytes]:
        """Each SSE data payload (JSON bytes) as it arrives, then DONE."""
        async for batch in self._read_batches(keep_usage_chunk, keep_chunk_usage):
            for payload in batch:
                yield payload

    async def _read_batches(self, keep_usage_chunk: bool,
                            keep_chunk_usage: bool) -> AsyncIterator[list[bytes]]:
        """The SSE data payloads of each network read (never an empty list),
        the last one ending with DONE. The usage-only final chunk is dropped
        unless `keep_usage_chunk`, the usage on the other chunks unless
        `keep_chunk_usage`."""
        assert self._resp is not None
        content, record = self._resp.content, self.record
        try:
            while True:
                waited_s = time.monotonic()
                data = await content.readany()
                record.upstream_wait_s += time.monotonic() - waited_s
                if not data:
                    break
                lines = (self._partial + data if self._partial else data).split(b"\n")
                self._partial = lines.pop()
                batch = []
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # the blank line between events, comments
                    payload = line[5:].strip()
                    if payload == DONE:
                        batch.append(DONE)
                        yield batch
                        await self._read_to_end()
                        return
                    if self._note_chunk(payload):
                        batch.append(payload if keep_chunk_usage else strip_usage(payload))
                    elif keep_usage_chunk:
                        batch.append(payload)
                if batch:
                    yield batch
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamFailed(f"replica {self.replica_id} failed mid-stream: {exc!r}",
                                 replica_id=self.replica_id) from None
        raise UpstreamFailed(f"replica {self.replica_id} ended the stream without [DONE]",
                             replica_id=self.replica_id)

    async def _read_to_end(self) -> None:
        """Reads what follows [DONE] (the body's last chunk, normally already
        here): a response released before its end closes its connection, and
        the next call would open another."""
        assert self._resp is not None
        content, left_bytes = self._resp.content, MAX_AFTER_DONE_BYTES
        waited_s = time.monotonic()
        try:
            async with asyncio.timeout(AFTER_DONE_WAIT_S):
                while left_bytes > 0 and (data := await content.readany()):
                    left_bytes -= len(data)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass  # the answer is complete; only the connection is lost
        finally:
            self.record.upstream_wait_s += time.monotonic() - waited_s

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


# vLLM writes `usage` compactly after `choices`, holding only numbers, nulls
# and at most one level of objects (prompt_tokens_details).
_USAGE_KEY = b',"usage":{'
_usage_free = msgspec.json.Decoder(dict)


def strip_usage(payload: bytes) -> bytes:
    """The chunk without its `usage` field (asked for metering, not by the
    client): cut out in vLLM's layout, else decoded and encoded again."""
    start = payload.find(_USAGE_KEY)
    if start < 0:
        if b'"usage"' not in payload:
            return payload
        return _reencoded_without_usage(payload)
    # Its keys hold no braces, and its values are numbers, nulls or objects.
    depth, pos = 1, start + len(_USAGE_KEY)
    while depth:
        close = payload.find(b"}", pos)
        if close < 0:
            return _reencoded_without_usage(payload)
        opened = payload.find(b"{", pos, close)
        depth, pos = (depth + 1, opened + 1) if opened >= 0 else (depth - 1, close + 1)
    return payload[:start] + payload[pos:]


def _reencoded_without_usage(payload: bytes) -> bytes:
    chunk = _usage_free.decode(payload)
    chunk.pop("usage", None)
    return msgspec.json.encode(chunk)
