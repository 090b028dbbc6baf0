"""After the traffic: wait for quiescence (spools drained, the usage stream
consumed, reservations settled), then gather what the checker reads into
the run's directory as JSONL: `rows.jsonl` (usage_raw, raw), `charges.jsonl`
(open quota charges); `history.jsonl` and `truth.jsonl` were written during
the run. `python -m loadtests.jepsen.check DIR` audits them again offline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec
import nats

from actors.control_store import connect_redis
from analytics.billing_audit import BilledRow, HistoryEntry, OpenCharge, TruthLine
from analytics.store import open_store
from loadtests.jepsen.stack import Stack, wait_for
from scheduler.config import Config
from scheduler.quota_ledger import CHARGE_PREFIX, Charge

SPOOL_DRAIN_TIMEOUT_S = 120.0
STREAM_DRAIN_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 30.0
METERING_CONSUMER = "yard-metering"
T = TypeVar("T")
ROW_COLUMNS = ("request_id", "tenant_id", "replica_id", "prompt_tokens", "completion_tokens",
               "status", "error_code")


async def spool_depth(http: aiohttp.ClientSession, api_url: str) -> int:
    async with http.get(api_url.removesuffix("/v1") + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("switchyard_usage_spool_depth_events "):
                return int(float(line.split()[1]))
    raise RuntimeError(f"{api_url}: no spool depth metric")


async def stream_drained(cfg: Config) -> bool:
    nc = await nats.connect(cfg.nats.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=2)
        info = await js.consumer_info(cfg.nats.usage_stream, METERING_CONSUMER)
    finally:
        await nc.close()
    return info.num_pending == 0 and info.num_ack_pending == 0


async def open_charges(cfg: Config, tenant_ids: list[str]) -> list[OpenCharge]:
    redis = connect_redis(cfg.redis)
    try:
        found = []
        for tenant_id in tenant_ids:
            fields = await redis.hgetall(cfg.quota.redis_prefix + tenant_id)
            for name, raw in fields.items():
                field = name.decode() if isinstance(name, bytes) else name
                if not field.startswith(CHARGE_PREFIX):
                    continue
                charge = msgspec.json.decode(raw, type=Charge)
                if charge.open:
                    found.append(OpenCharge(tenant_id=tenant_id, lease=charge.lease,
                                            charge_id=field.removeprefix(CHARGE_PREFIX)))
        return found
    finally:
        await redis.aclose()


async def quiesce(stack: Stack) -> dict[str, float]:
    """Waits until nothing is in flight; the seconds each wait took."""
    cfg = stack.config
    took: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        async def spools_empty() -> bool:
            depths = await asyncio.gather(*(spool_depth(http, url) for url in stack.urls))
            return not any(depths)

        took["spools_drained_s"] = await wait_for(spools_empty, SPOOL_DRAIN_TIMEOUT_S,
                                                  "ingress usage spools")
    took["stream_drained_s"] = await wait_for(lambda: stream_drained(cfg),
                                              STREAM_DRAIN_TIMEOUT_S, "usage stream")
    tenant_ids = [t.tenant_id for t in stack.tenants]

    async def settled() -> bool:
        return not any(not c.lease for c in await open_charges(cfg, tenant_ids))

    started_s = time.monotonic()
    try:
        await wait_for(settled, SETTLE_TIMEOUT_S, "quota reservations")
    except TimeoutError:
        pass  # what stays open is the checker's (e) to report
    took["reservations_settled_s"] = time.monotonic() - started_s
    return took


def read_rows(cfg: Config) -> list[BilledRow]:
    """Blocking (chDB): run in a thread, after the metering process let go of the path."""
    store = open_store(cfg.metering.clickhouse, cfg.var_dir)
    try:
        result = store.client.query(
            f"SELECT {', '.join(ROW_COLUMNS)} FROM {store.database}.usage_raw")
        return [BilledRow(**dict(zip(ROW_COLUMNS, row, strict=True)))
                for row in result.result_rows]
    finally:
        store.close()


def rollup_drift(cfg: Config) -> dict[str, int]:
    """Blocking (chDB). What the per-minute rollups (dashboards) count beyond
    usage_raw FINAL (billing): requests and completion tokens, negative when
    they count less. Not one of T31's checks; reported beside them."""
    store = open_store(cfg.metering.clickhouse, cfg.var_dir)
    try:
        db = store.database
        [(requests, tokens)] = store.client.query(
            f"SELECT (SELECT sum(requests) FROM {db}.usage_minute)"
            f" - (SELECT count() FROM {db}.usage_raw FINAL),"
            f" (SELECT sum(completion_tokens) FROM {db}.usage_minute)"
            f" - (SELECT sum(completion_tokens) FROM {db}.usage_raw FINAL)").result_rows
        return {"rollup_requests_drift": int(requests),
                "rollup_completion_tokens_drift": int(tokens)}
    finally:
        store.close()


def write_jsonl(path: Path, items: list[msgspec.Struct]) -> None:
    encoder = msgspec.json.Encoder()
    path.write_bytes(b"".join(encoder.encode(item) + b"\n" for item in items))


def read_jsonl(path: Path, kind: type[T]) -> list[T]:
    decoder = msgspec.json.Decoder(kind)
    with path.open("rb") as lines:
        return [decoder.decode(line) for line in lines if line.strip()]


Artifacts = tuple[list[HistoryEntry], list[TruthLine], list[BilledRow], list[OpenCharge]]


def read_artifacts(work: Path) -> Artifacts:
    return (read_jsonl(work / "history.jsonl", HistoryEntry),
            read_jsonl(work / "truth.jsonl", TruthLine),
            read_jsonl(work / "rows.jsonl", BilledRow),
            read_jsonl(work / "charges.jsonl", OpenCharge))
