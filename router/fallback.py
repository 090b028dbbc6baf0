"""Ingress-local placement for when no scheduler actor can be asked (NATS
down, no actor subscribed, none answering): the ingress places the request
itself with the same pure core (scheduler/core.py) and the profile named by
`ingress.fallback_profile`, over its own view of the replicas.

That view is the Redis replica registry (ids, URLs, models, the operator's
drain flag), reread every `scheduler.registry_refresh_s`, plus what this
ingress sees: its own requests in flight per replica (counted at placement,
released when each ends) and the replicas that failed its requests
(ejected, as the actors do). Load snapshots and KV events travel on NATS, so
the fallback does not use them; a replica that died is found by the retry
path and ejected here.

`FallbackGate` decides when to fall back: at once while NATS is
disconnected, and after a placement found no scheduler; then every
`PROBE_INTERVAL_S` one placement (the probe) tries the actors again, and
its answer ends the fallback. So an outage costs at most one
placement timeout per probe, not one per request.

The scheduler actors never hear of fallback placements (their completion
notices, sent once NATS is back, name requests they never counted and change
nothing), so their in-flight counts miss those requests until the replicas'
next load reports show them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator

import msgspec
import redis.exceptions

from actors.control_store import ReplicaRegistry
from router.metrics import Metrics
from scheduler.config import Config
from scheduler.core import SchedulerCore
from scheduler.wire import ModelCard, Placement, PlaceRejected, PlaceRequest

log = logging.getLogger("switchyard.fallback")
# While falling back, one placement in this long asks the scheduler actors again.
PROBE_INTERVAL_S = 1.0


class FallbackGate:
    """Pure: whether a placement goes to the actors or to the local core.
    `clock_s` is injected; the owner reports each outcome."""

    def __init__(self, clock_s: Callable[[], float] = time.monotonic) -> None:
        self.clock_s = clock_s
        self.active = False
        self._probe_at_s = 0.0
        self._probing = False

    def local(self, connected: bool) -> bool:
        """True: place locally. False: ask the actors (when falling back,
        this placement is the probe; report its outcome)."""
        if not connected:
            self._fall_back()
            return True
        if not self.active:
            return False
        if self._probing or self.clock_s() < self._probe_at_s:
            return True
        self._probing = True
        return False

    def unreachable(self) -> None:
        """A placement found no scheduler."""
        self._fall_back()

    def answered(self, probe: bool) -> None:
        """The actors answered a placement. Only the probe's answer ends the
        fallback: one sent before it started says nothing of now."""
        if probe:
            self._probing = False
            self.active = False

    def probe_lost(self) -> None:
        """The probe ended without an answer for another reason (its client left)."""
        self._probing = False

    def _fall_back(self) -> None:
        self.active = True
        self._probing = False
        self._probe_at_s = self.clock_s() + PROBE_INTERVAL_S


class FallbackPlacer:
    """The local core and the task that keeps its registry fresh."""

    def __init__(self, cfg: Config, registry: ReplicaRegistry, metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        sched = msgspec.structs.replace(cfg.scheduler, profile=cfg.ingress.fallback_profile)
        self.core = SchedulerCore(sched, rng or random.Random(), cfg.models)
        self.gate = FallbackGate()
        self._registry = registry
        self._refresh_s = cfg.scheduler.registry_refresh_s
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reads the registry once (a failure leaves it to the refresh task)."""
        await self.reload()
        self._task = asyncio.create_task(self._refresh_forever(), name="fallback-registry")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def local(self, connected: bool) -> bool:
        """Whether this placement is made here (see FallbackGate.local)."""
        with self._transitions("NATS is disconnected"):
            return self.gate.local(connected)

    def unreachable(self) -> None:
        with self._transitions("no scheduler actor answered"):
            self.gate.unreachable()

    def settled(self, probe: bool, answered: bool) -> None:
        """A placement asked of the actors ended: they `answered` it, or it
        was abandoned (then it tells nothing)."""
        with self._transitions(""):
            if answered:
                self.gate.answered(probe)
            elif probe:
                self.gate.probe_lost()

    def place(self, req: PlaceRequest, reason: str) -> Placement | PlaceRejected:
        """Places `req` here; `reason` (disconnected, unreachable) labels the metric."""
        self._metrics.placement_fallbacks.labels(reason).inc()
        return self.core.place(req, time.monotonic())

    def done(self, request_id: str) -> None:
        self.core.done(request_id)

    def replica_failed(self, replica_id: str) -> None:
        self.core.replica_failed(replica_id, time.monotonic())

    def models(self) -> tuple[ModelCard, ...]:
        return self.core.models()

    @contextlib.contextmanager
    def _transitions(self, why: str) -> Iterator[None]:
        """Logs a change of mode once (not per request) and shows it in the gauge."""
        was = self.gate.active
        yield
        if self.gate.active == was:
            return
        self._metrics.placement_fallback_active.set(1 if self.gate.active else 0)
        if self.gate.active:
            log.warning("placing requests on this ingress (%s) over %d registered replicas",
                        why, len(self.core.replicas))
        else:
            log.warning("the scheduler actors answer again: placement goes back to them")

    async def reload(self) -> None:
        try:
            self.core.set_replicas(await self._registry.replicas())
        except (redis.exceptions.RedisError, OSError, msgspec.DecodeError) as exc:
            # Keep the last view: a fallback with an old registry beats none.
            log.warning("fallback registry reload failed: %r", exc)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.reload()
