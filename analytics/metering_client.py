"""Asks the metering service (which alone owns ClickHouse) for usage rows and
statement usage over NATS request/reply."""

from __future__ import annotations

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from scheduler.errors import InternalError, ServiceUnavailable
from scheduler.wire import STATEMENT_SUBJECT, USAGE_ROWS_SUBJECT, encode
from scheduler.wire.usage import (
    StatementQuery,
    StatementUsage,
    UsageRow,
    UsageRowsQuery,
    statement_reply_decoder,
    usage_rows_reply_decoder,
)

# ClickHouse answers a month of one tenant's rows well inside this.
QUERY_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1.0


class MeteringClient:
    def __init__(self, nc: NATS, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self._nc = nc
        self._timeout_s = timeout_s

    async def usage_rows(self, query: UsageRowsQuery) -> tuple[UsageRow, ...]:
        reply = usage_rows_reply_decoder.decode(await self._ask(USAGE_ROWS_SUBJECT, query))
        if reply.error:
            raise InternalError(f"the metering service failed: {reply.error}")
        return reply.rows

    async def statement_usage(self, query: StatementQuery) -> tuple[StatementUsage, ...]:
        reply = statement_reply_decoder.decode(await self._ask(STATEMENT_SUBJECT, query))
        if reply.error:
            raise InternalError(f"the metering service failed: {reply.error}")
        return reply.usage

    async def _ask(self, subject: str, query: msgspec.Struct) -> bytes:
        try:
            msg = await self._nc.request(subject, encode(query), timeout=self._timeout_s)
        except nats.errors.NoRespondersError:
            raise ServiceUnavailable("The metering service is not running.",
                                     retry_after_s=RETRY_AFTER_S) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise ServiceUnavailable(f"The metering service did not answer: {exc!r}",
                                     retry_after_s=RETRY_AFTER_S) from None
        return msg.data
