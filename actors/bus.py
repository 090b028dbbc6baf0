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
                      reconnected: Callable[[], Awaitable[None]] | None = None) -> NATS:
    """`reconnected`: called each time the connection is back after an outage
    (subscriptions renewed); whatever was broadcast meanwhile was missed."""
    try:
        return await asyncio.wait_for(
            nats.connect(cfg.url, name=name, max_reconnect_attempts=-1,
                         connect_timeout=cfg.request_timeout_s, reconnected_cb=reconnected),
            timeout=FIRST_CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ServiceUnavailable(f"NATS at {cfg.url} unreachable: {exc!r}") from None
