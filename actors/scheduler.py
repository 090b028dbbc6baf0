"""The scheduler's I/O shell: serves placement requests over NATS around the
pure PlacementTable. Hosted by a Ray actor (actors/ray_shells.py); plain
asyncio here so it can be tested on its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.bus import connect_bus
from actors.control_store import ReplicaRegistry, connect_redis
from scheduler.config import Config
from scheduler.placement import PlacementTable
from scheduler.wire import (
    DONE_SUBJECT,
    MODELS_SUBJECT,
    PLACE_QUEUE,
    PLACE_SUBJECT,
    REGISTRY_CHANGED_SUBJECT,
    ModelsReply,
    done_decoder,
    encode,
    place_request_decoder,
)

log = logging.getLogger("switchyard.scheduler")


class SchedulerService:
    def __init__(self, cfg: Config, rng: random.Random | None = None,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock_s = clock_s
        self.table = PlacementTable(rng or random.Random(), cfg.scheduler.placement_ttl_s)
        self._nc: NATS | None = None
        self._registry: ReplicaRegistry | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._nc = await connect_bus(self.cfg.nats, "switchyard-scheduler")
        self._registry = ReplicaRegistry(connect_redis(self.cfg.redis))
        await self.reload_registry()
        nc = self._nc
        await nc.subscribe(PLACE_SUBJECT.format(model="*"), queue=PLACE_QUEUE, cb=self._on_place)
        await nc.subscribe(MODELS_SUBJECT, queue=PLACE_QUEUE, cb=self._on_models)
        await nc.subscribe(DONE_SUBJECT, cb=self._on_done)
        await nc.subscribe(REGISTRY_CHANGED_SUBJECT, cb=self._on_registry_changed)
        await nc.flush()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="registry-refresh")

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._nc is not None:
            await self._nc.drain()
        if self._registry is not None:
            await self._registry.redis.aclose()

    async def reload_registry(self) -> None:
        assert self._registry is not None
        self.table.set_replicas(await self._registry.replicas())

    def stats(self) -> dict[str, int]:
        return {"replicas": len(self.table.replicas), "in_flight": self.table.in_flight_count()}

    async def _refresh_forever(self) -> None:
        # Backstop for a missed "registry changed" notice.
        while True:
            await asyncio.sleep(self.cfg.scheduler.registry_refresh_s)
            try:
                await self.reload_registry()
            except Exception:
                log.warning("registry reload failed", exc_info=True)

    async def _on_place(self, msg: Msg) -> None:
        try:
            req = place_request_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("malformed placement request dropped")
            return
        await msg.respond(encode(self.table.place(req, self.clock_s())))

    async def _on_done(self, msg: Msg) -> None:
        try:
            self.table.done(done_decoder.decode(msg.data).request_id)
        except msgspec.DecodeError:
            log.warning("malformed completion notice dropped")

    async def _on_models(self, msg: Msg) -> None:
        await msg.respond(encode(ModelsReply(models=self.table.models())))

    async def _on_registry_changed(self, msg: Msg) -> None:
        await self.reload_registry()
