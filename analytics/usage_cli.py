"""`switchyard usage [--tenant T]`: usage totals per tenant. Asks the running
metering service over NATS; when the stack is not running, reads the store
directly (which works only while no other process holds the chDB path)."""

from __future__ import annotations

import asyncio
from typing import TextIO

import nats
import nats.errors

from analytics.store import chdb_path, open_store
from scheduler.config import Config
from scheduler.wire import USAGE_QUERY_SUBJECT, UsageQuery, UsageTotal, encode, usage_reply_decoder

_HEADER = ("tenant", "requests", "prompt_tokens", "cached_tokens", "completion_tokens")


class _ServiceAway(Exception):
    """The metering service could not be asked; the message says why."""


class _ServiceFailed(Exception):
    """The metering service answered with an error."""


async def print_usage(cfg: Config, tenant_id: str | None, out: TextIO) -> int:
    """Prints the totals table to `out`; returns the process exit code."""
    try:
        totals = await _ask_service(cfg, tenant_id)
        source = "metering service"
    except _ServiceAway as away:
        try:
            totals = await asyncio.to_thread(_read_store, cfg, tenant_id)
        except Exception as exc:  # noqa: BLE001 - reported to the user with the first reason
            print(f"switchyard usage: {away}; reading the usage store failed too: {exc}",
                  file=out)
            return 1
        source = f"usage store ({away})"
    except _ServiceFailed as exc:
        print(f"switchyard usage: the metering service failed: {exc}", file=out)
        return 1
    print(_table(totals), file=out)
    print(f"source: {source}", file=out)
    return 0


async def _ignore_nats_error(exc: Exception) -> None:
    """nats-py would log each connection error; print_usage reports its own."""


async def _ask_service(cfg: Config, tenant_id: str | None) -> tuple[UsageTotal, ...]:
    timeout_s = cfg.nats.request_timeout_s
    try:
        # nats-py retries the first connect forever unless attempts are capped
        # (0 means unlimited there); wait_for bounds the whole attempt anyway.
        nc = await asyncio.wait_for(nats.connect(
            cfg.nats.url, name="switchyard-usage-cli", connect_timeout=timeout_s,
            allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0,
            error_cb=_ignore_nats_error), timeout=2 * timeout_s)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        reason = str(exc) or type(exc).__name__
        raise _ServiceAway(f"NATS at {cfg.nats.url} not reachable ({reason})") from None
    try:
        msg = await nc.request(USAGE_QUERY_SUBJECT, encode(UsageQuery(tenant_id=tenant_id)),
                               timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise _ServiceAway("no metering service is running") from None
    except TimeoutError:
        raise _ServiceAway(f"the metering service did not answer in {timeout_s:g} s") from None
    finally:
        await nc.close()
    reply = usage_reply_decoder.decode(msg.data)
    if reply.error:
        raise _ServiceFailed(reply.error)
    return reply.totals


def _read_store(cfg: Config, tenant_id: str | None) -> tuple[UsageTotal, ...]:
    ch = cfg.metering.clickhouse
    if ch.interface == "chdb" and not chdb_path(ch, cfg.var_dir).exists():
        raise FileNotFoundError(f"no usage store at {chdb_path(ch, cfg.var_dir)}")
    store = open_store(ch, cfg.var_dir)
    try:
        return store.totals(tenant_id)
    finally:
        store.close()


def _table(totals: tuple[UsageTotal, ...]) -> str:
    if not totals:
        return "no usage recorded"
    rows = [_HEADER] + [
        (t.tenant_id, str(t.requests), str(t.prompt_tokens), str(t.cached_tokens),
         str(t.completion_tokens)) for t in totals]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    cells = [[row[0].ljust(widths[0])]
             + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)] for row in rows]
    return "\n".join("  ".join(line) for line in cells)
