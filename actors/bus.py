"""Connecting to NATS, the bus between every process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
import nats.errors
from nats.aio.client import Client as NATS

from scheduler.config import NatsConfig
from scheduler.errors import ServiceUnavailable

# nats-py's connect() keeps retrying forever while the server is away
# (whatever max_reconnect_attempts says), so the first connect is bounded here.
FIRST_CONNECT_TIMEOUT_S = 10.0


async def connect_bus(cfg: NatsConfig, name: str,
                      reconnected: Callable[[], Awaitable[None]] | None = None,
                      echo: bool = True) -> NATS:
    """`reconnected`: called each time the connection is back after an outage
    (subscriptions renewed); whatever was broadcast meanwhile was missed.
    `echo=False`: the server does not deliver this connection's own messages
    to its subscriptions (for a process that never needs to hear itself)."""
    try:
        return await asyncio.wait_for(
            nats.connect(cfg.url, name=name, max_reconnect_attempts=-1,
                         connect_timeout=cfg.request_timeout_s, reconnected_cb=reconnected,
                         no_echo=not echo),
            timeout=FIRST_CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ServiceUnavailable(f"NATS at {cfg.url} unreachable: {exc!r}") from None
