"""A stack for the usage and billing tests: the real admin API (tests/admin_stack.py)
and the real MeteringService (chDB) on one nats-server and Redis database,
with usage seeded through the pipeline: UsageEvents published to JetStream
with their request ids as Nats-Msg-Id, ingested and priced by the service."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats

from actors.control_plane import PRICES_KEY
from analytics.metering import MeteringService
from scheduler.config import ClickHouseConfig, Config, MeteringConfig
from scheduler.tenancy import Price
from scheduler.wire import UsageEvent, encode, usage_subject
from tests.admin_stack import AdminStack, running_admin
from tests.harness import nats_client, running_metering

DEADLINE_S = 20.0
OCT_2026_S = 1_790_812_800  # 2026-10-01T00:00:00Z
NOV_2026_S = 1_793_491_200  # 2026-11-01T00:00:00Z
PRICE_CHANGE_S = 1_792_022_400  # 2026-10-15T00:00:00Z
# "tiny" changes price mid-October; "big" is priced from October on only.
PRICES = {
    "tiny": (Price(effective_from_s=0, input_nusd_per_token=100,
                   cached_input_nusd_per_token=50, output_nusd_per_token=400),
             Price(effective_from_s=PRICE_CHANGE_S, input_nusd_per_token=150,
                   cached_input_nusd_per_token=75, output_nusd_per_token=600)),
    "big": (Price(effective_from_s=OCT_2026_S, input_nusd_per_token=3_000,
                  cached_input_nusd_per_token=1_500, output_nusd_per_token=15_000),),
}


@dataclass
class BillingStack:
    admin: AdminStack
    metering: MeteringService
    events: list[UsageEvent]


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def seeded_events(tenants: list[str], rng: random.Random) -> list[UsageEvent]:
    """September to mid-November, two models, three keys, some errors."""
    events = []
    for i in range(600):
        started_s = rng.randrange(OCT_2026_S - 10 * 86_400, NOV_2026_S + 10 * 86_400)
        prompt = rng.randrange(1, 2_000)
        status = 200 if rng.random() > 0.05 else 500
        events.append(UsageEvent(
            request_id=f"seed-{i}-{uuid.uuid4().hex[:8]}", tenant_id=rng.choice(tenants),
            key_id=f"key-{rng.randrange(3)}",
            model="big" if started_s >= OCT_2026_S and rng.random() < 0.3 else "tiny",
            replica_id="r0", route="chat", prompt_tokens=prompt,
            cached_tokens=rng.randrange(0, prompt + 1), completion_tokens=rng.randrange(0, 500),
            ttft_ms=rng.uniform(5, 300), latency_ms=rng.uniform(300, 3_000), status=status,
            started_at_ms=started_s * 1000 + rng.randrange(1000)))
    return events


async def publish(nc: nats.NATS, events: list[UsageEvent]) -> None:
    js = nc.jetstream()
    for start in range(0, len(events), 100):
        await asyncio.gather(*(
            js.publish(usage_subject(e.tenant_id), encode(e), headers={"Nats-Msg-Id": e.request_id})
            for e in events[start:start + 100]))


def metering_config(admin_cfg: Config, work: Path) -> Config:
    stream = f"USAGE_BILLING_{uuid.uuid4().hex[:8]}"
    return msgspec.structs.replace(
        admin_cfg, var_dir=str(work),
        nats=msgspec.structs.replace(admin_cfg.nats, usage_stream=stream),
        metering=MeteringConfig(batch_max=500, fetch_wait_s=0.1,
                                dead_letter_stream=f"DLQ_{stream}",
                                clickhouse=ClickHouseConfig(path=str(work / "chdb"),
                                                            database="yard_billing")))


@contextlib.asynccontextmanager
async def running_billing(work: Path, nats_url: str, redis_url: str,
                          seed: int = 7) -> AsyncIterator[BillingStack]:
    async with running_admin(work, nats_url, redis_url) as admin:
        for model, prices in PRICES.items():
            await admin.plane.redis.hset(PRICES_KEY, model, msgspec.json.encode(prices))
        events = seeded_events([admin.tenant_a, admin.tenant_b], random.Random(seed))
        async with (nats_client(nats_url) as nc,
                    running_metering(metering_config(admin.cfg, work)) as metering):
            await publish(nc, events)

            async def stored() -> bool:
                return metering.stats()["inserted_rows"] == len(events)

            await eventually(stored, "the seeded usage to be stored")
            yield BillingStack(admin=admin, metering=metering, events=events)
