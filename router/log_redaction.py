"""Keeps what clients send out of the logs.

aiohttp logs a request it cannot parse ("Error handling request") with the
parser's error, whose text quotes the offending bytes: a request line with a
key in its query string, an `Authorization` header with a stray control
character, the first 100 bytes of a header line too long. The filter keeps
the record and drops that quote."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

SERVER_LOGGER = "aiohttp.server"


class UnparsedRequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = _parse_error(record.exc_info[1] if record.exc_info else None)
        if error is not None:
            record.msg = (f"{record.getMessage()}: {type(error).__name__} {error.code} "
                          f"(the request's bytes are not logged)")
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _parse_error(exc: BaseException | None) -> HttpProcessingError | None:
    """The parse error in `exc`'s chain, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, HttpProcessingError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def quote_no_requests() -> None:
    """Installs the filter on aiohttp's server logger (once per process)."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, UnparsedRequestFilter) for f in logger.filters):
        logger.addFilter(UnparsedRequestFilter())
