"""One wildcard subscription for the replies to many requests.

Each request gets a reply subject of its own under this inbox's prefix, and
every reply arrives on the one subscription: no subscription, inbox future
or task per request (nats-py's `request` costs all three), which matters on
every request's path. The caller keeps what it waits for by token."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

NO_RESPONDERS_STATUS = "503"


class ReplyInbox:
    def __init__(self, nc: NATS, on_reply: Callable[[Msg], Awaitable[None]]) -> None:
        self._nc = nc
        self._on_reply = on_reply
        self._prefix = ""
        self._sub: Subscription | None = None
        self._tokens = itertools.count()

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_reply)

    async def aclose(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    def new_reply(self) -> tuple[str, str]:
        """A fresh (token, reply subject)."""
        token = str(next(self._tokens))
        return token, f"{self._prefix}.{token}"


def reply_token(msg: Msg) -> str:
    """The token of the reply subject `msg` arrived on."""
    return msg.subject.rpartition(".")[2]


def no_responders(msg: Msg) -> bool:
    """The status NATS sends on a reply subject when nobody subscribes to
    the request's subject."""
    return bool(msg.headers) and msg.headers.get("Status") == NO_RESPONDERS_STATUS
