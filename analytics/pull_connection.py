"""PullConnection: a NATS connection of its own for the metering consumer's
pull loop, speaking the client protocol directly.

Why not nats-py for this part: it parses every message in Python one at a
time, parses its headers into a dict and builds a `Msg`, then hands each to
the subscription through a queue and a task switch, about 20 us of the loop
per usage event and most of its time. Here one `data_received` slices every
complete `HMSG`/`MSG` frame of what the socket brought into (subject, reply,
header, payload) tuples and hands them over as one list; headers are left
as bytes (a data message's are only its `Nats-Msg-Id`; a status message's
first line is all that is read). Acks leave as one write per batch.

Only what a pull consumer needs: CONNECT (user and password or token from
the URL), one wildcard subscription, PUB, PING/PONG both ways. No TLS and
no reconnect: a lost connection fails the waiting call, and the owner opens
a new one (the unacked messages come back after the consumer's ack_wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import msgspec

# (subject, reply, header block or b"", payload); the bytes as on the wire.
Frame = tuple[bytes, bytes, bytes, bytes]

_CRLF = b"\r\n"
_PING = b"PING\r\n"
_PONG = b"PONG\r\n"
CONNECT_TIMEOUT_S = 5.0


class _Connect(msgspec.Struct):
    verbose: bool = False
    pedantic: bool = False
    headers: bool = True
    no_responders: bool = True
    protocol: int = 1
    lang: str = "python-switchyard"
    version: str = "1"
    name: str = ""
    user: str | None = None
    # "pass" is a keyword.
    password: str | None = msgspec.field(default=None, name="pass")
    auth_token: str | None = None


class _Info(msgspec.Struct):
    tls_required: bool = False
    max_payload: int = 1 << 20


_info_decoder = msgspec.json.Decoder(_Info)


class PullConnectionLost(ConnectionError):
    """The connection closed or the server sent -ERR."""


def connect_options(url: str, name: str) -> _Connect:
    """CONNECT's fields from a nats:// URL (credentials as nats-py reads them:
    user:password@, or a token alone before the @)."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", ""):
        raise ValueError(f"the metering pull connection speaks plain nats://, not {url!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if user is not None and password is None:
        return _Connect(name=name, auth_token=user)
    return _Connect(name=name, user=user, password=password)


class FrameParser:
    """Splits the server's byte stream into frames; keeps a partial one for
    the next feed. `feed` returns the message frames and counts the PINGs
    the caller must answer; -ERR raises."""

    def __init__(self) -> None:
        self._buf = b""
        self.pings = 0
        self.pongs = 0
        self.info: bytes = b""

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf + data if self._buf else data
        frames: list[Frame] = []
        pos, end = 0, len(buf)
        find = buf.find
        while pos < end:
            eol = find(_CRLF, pos)
            if eol < 0:
                break
            op = buf[pos:pos + 4]
            if op == b"HMSG" or op[:3] == b"MSG":
                args = buf[pos:eol].split()
                if op == b"HMSG":
                    header_len, total_len = int(args[-2]), int(args[-1])
                else:
                    header_len, total_len = 0, int(args[-1])
                start = eol + 2
                if start + total_len + 2 > end:
                    break  # the payload has not all arrived
                reply = args[3] if len(args) == (6 if op == b"HMSG" else 5) else b""
                frames.append((args[1], reply, buf[start:start + header_len],
                               buf[start + header_len:start + total_len]))
                pos = start + total_len + 2
                continue
            line = buf[pos:eol]
            pos = eol + 2
            if line == b"PING":
                self.pings += 1
            elif line == b"PONG":
                self.pongs += 1
            elif line.startswith(b"INFO"):
                self.info = line[5:]
            elif line.startswith(b"-ERR"):
                raise PullConnectionLost(f"NATS error: {line[5:].decode(errors='replace')}")
            # +OK (verbose is off, but harmless) and anything else: nothing to do.
        self._buf = buf[pos:]
        return frames


class PullConnection(asyncio.Protocol):
    """Open with `connect()`; `on_frames` gets each socket read's message
    frames, in order, on the loop."""

    def __init__(self, on_frames: Callable[[list[Frame]], None]) -> None:
        self._on_frames = on_frames
        self._parser = FrameParser()
        self._transport: asyncio.Transport | None = None
        self._pong_waiters: list[asyncio.Future[None]] = []
        self._info = asyncio.get_running_loop().create_future()
        self._lost: BaseException | None = None
        self._sid = 0

    @classmethod
    async def connect(cls, url: str, name: str,
                      on_frames: Callable[[list[Frame]], None]) -> PullConnection:
        parts = urlsplit(url)
        options = connect_options(url, name)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await loop.create_connection(
                lambda: cls(on_frames), parts.hostname or "127.0.0.1", parts.port or 4222)
            try:
                info = _info_decoder.decode(await asyncio.shield(conn._info))
                if info.tls_required:
                    raise PullConnectionLost("the server requires TLS")
                conn._write(b"CONNECT " + msgspec.json.encode(options) + _CRLF)
                await conn.flush()
            except BaseException:
                conn.close()
                raise
        return conn

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._lost is None

    def subscribe(self, subject: str) -> None:
        self._sid += 1
        self._write(f"SUB {subject} {self._sid}\r\n".encode())

    def publish(self, subject: str | bytes, payload: bytes, reply: str = "") -> None:
        if isinstance(subject, str):
            subject = subject.encode()
        head = b"PUB " + subject + (b" " + reply.encode() if reply else b"")
        self._write(b"%s %d\r\n%s\r\n" % (head, len(payload), payload))

    def publish_each(self, subjects: list[bytes], payload: bytes) -> None:
        """The same payload to each subject, in one write (acks of a batch)."""
        frame_tail = b" %d\r\n%s\r\n" % (len(payload), payload)
        self._write(b"".join([b"PUB " + s + frame_tail for s in subjects]))

    async def flush(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Returns once the server has read everything written before (its PONG)."""
        waiter = asyncio.get_running_loop().create_future()
        self._pong_waiters.append(waiter)
        self._write(_PING)
        async with asyncio.timeout(timeout_s):
            await waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        if self._lost is not None or self._transport is None:
            raise PullConnectionLost(f"the pull connection is closed: {self._lost!r}")
        self._transport.write(data)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        try:
            frames = parser.feed(data)
        except PullConnectionLost as exc:
            self._fail(exc)
            return
        if parser.info and not self._info.done():
            self._info.set_result(parser.info)
        while parser.pings:
            parser.pings -= 1
            self._transport.write(_PONG)  # type: ignore[union-attr]
        while parser.pongs:
            parser.pongs -= 1
            if self._pong_waiters:
                waiter = self._pong_waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(None)
        if frames:
            self._on_frames(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(PullConnectionLost(f"the pull connection closed: {exc!r}"))

    def _fail(self, exc: PullConnectionLost) -> None:
        if self._lost is None:
            self._lost = exc
        for waiter in [self._info, *self._pong_waiters]:
            if not waiter.done():
                waiter.set_exception(exc)
                # Retrieved here, so a waiter nobody awaits logs nothing.
                waiter.exception()
        self._pong_waiters.clear()
        if self._transport is not None:
            self._transport.close()
        self._on_frames([])
