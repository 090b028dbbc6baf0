"""Unit tests of the ingress's fallback placement (router/fallback.py) and
its price check (router/prices.py), with an injected clock and stand-ins
for Redis: when the gate places locally, one probe at a time asks the
actors again; the local core places by its own in-flight counts over the
registry, skips draining and failed replicas; prices decide 403 / 404."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgspec
import pytest
import redis.exceptions

from router.fallback import PROBE_INTERVAL_S, FallbackGate, FallbackPlacer
from router.metrics import Metrics
from router.prices import PriceBook
from scheduler.config import Config, IngressConfig
from scheduler.errors import ConfigError, ModelNotFound, ModelNotPriced, ServiceUnavailable
from scheduler.tenancy import Price
from scheduler.wire import Placement, PlaceRejected, PlaceRequest, ReplicaInfo


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


# Each step: (what happens, argument, expected answer of `local` or None, active after).
# "local": gate.local(connected=arg); "unreachable"; "answered": gate.answered(probe=arg);
# "lost": gate.probe_lost(); "tick": the clock moves arg seconds.
GATE_CASES = {
    "connected and never failed: actors": [
        ("local", True, False, False), ("answered", False, None, False)],
    "disconnected: local at once, until a probe is answered": [
        ("local", False, True, True), ("local", False, True, True),
        ("local", True, True, True),  # reconnected, but within the probe interval
        ("tick", PROBE_INTERVAL_S, None, True),
        ("local", True, False, True),  # the probe
        ("local", True, True, True),  # one probe at a time
        ("answered", True, None, False),
        ("local", True, False, False)],
    "unreachable: local until the probe, whose failure re-arms it": [
        ("local", True, False, False), ("unreachable", None, None, True),
        ("local", True, True, True), ("tick", PROBE_INTERVAL_S, None, True),
        ("local", True, False, True), ("unreachable", None, None, True),
        ("local", True, True, True), ("tick", PROBE_INTERVAL_S / 2, None, True),
        ("local", True, True, True)],
    "a lost probe lets the next placement probe": [
        ("unreachable", None, None, True), ("tick", PROBE_INTERVAL_S, None, True),
        ("local", True, False, True), ("lost", None, None, True),
        ("local", True, False, True)],
    "an answer to a placement sent before the outage does not end it": [
        ("unreachable", None, None, True), ("answered", False, None, True),
        ("local", True, True, True)],
}


@pytest.mark.parametrize("steps", GATE_CASES.values(), ids=GATE_CASES.keys())
def test_gate(steps: list[tuple[str, object, bool | None, bool]]) -> None:
    clock = Clock()
    gate = FallbackGate(clock)
    for i, (what, arg, expected, active) in enumerate(steps):
        answer = None
        if what == "local":
            answer = gate.local(bool(arg))
        elif what == "unreachable":
            gate.unreachable()
        elif what == "answered":
            gate.answered(bool(arg))
        elif what == "lost":
            gate.probe_lost()
        else:
            assert isinstance(arg, float)
            clock.now_s += arg
        assert (answer, gate.active) == (expected, active), f"step {i}: {what}"


@dataclass
class FakeRegistry:
    infos: list[ReplicaInfo]
    fail: bool = False

    async def replicas(self) -> list[ReplicaInfo]:
        if self.fail:
            raise redis.exceptions.ConnectionError("down")
        return self.infos


def _placer(registry: FakeRegistry, cfg: Config | None = None) -> tuple[FallbackPlacer, Metrics]:
    metrics = Metrics()
    placer = FallbackPlacer(cfg or Config(), registry,  # type: ignore[arg-type]
                            metrics, random.Random(7))
    return placer, metrics


def _req(i: int, model: str = "m", exclude: tuple[str, ...] = ()) -> PlaceRequest:
    return PlaceRequest(request_id=f"r-{i}", tenant_id="t", model=model, exclude=exclude)


def _infos(*ids: str, draining: frozenset[str] = frozenset()) -> list[ReplicaInfo]:
    return [ReplicaInfo(id=i, url=f"http://{i}", models=("m",), draining=i in draining)
            for i in ids]


async def test_least_load_spreads_by_the_ingress_own_in_flight_counts() -> None:
    placer, metrics = _placer(FakeRegistry(_infos("a", "b", "c")))
    await placer.start()
    try:
        chosen = [placer.place(_req(i), "disconnected") for i in range(6)]
        assert all(isinstance(p, Placement) for p in chosen)
        replicas = sorted(p.replica_id for p in chosen if isinstance(p, Placement))
        assert replicas == ["a", "a", "b", "b", "c", "c"]
        # Two end on "a": it is the least loaded now.
        done = [p.request_id for p in chosen if isinstance(p, Placement) and p.replica_id == "a"]
        for request_id in done:
            placer.done(request_id)
        again = placer.place(_req(10), "unreachable")
        assert isinstance(again, Placement) and again.replica_id == "a"
        count = metrics.registry.get_sample_value
        assert count("switchyard_placement_fallbacks_total", {"reason": "disconnected"}) == 6
        assert count("switchyard_placement_fallbacks_total", {"reason": "unreachable"}) == 1
    finally:
        await placer.aclose()


async def test_draining_failed_and_unknown() -> None:
    registry = FakeRegistry(_infos("a", "b", draining=frozenset({"b"})))
    placer, _ = _placer(registry)
    await placer.start()
    try:
        assert all(getattr(placer.place(_req(i), "disconnected"), "replica_id", "") == "a"
                   for i in range(3))
        # A retry without the replica that failed it: none left.
        retry = placer.place(_req(0, exclude=("a",)), "disconnected")
        assert isinstance(retry, PlaceRejected) and retry.code == "no_capacity"
        unknown = placer.place(_req(5, model="other"), "disconnected")
        assert isinstance(unknown, PlaceRejected) and unknown.code == "model_not_found"
        # A failed replica is ejected here (the last one of a model never is).
        registry.infos = _infos("a", "b")
        await placer.reload()
        placer.replica_failed("a")
        assert all(getattr(placer.place(_req(20 + i), "unreachable"), "replica_id", "") == "b"
                   for i in range(3))
        # Redis away: the last registry is kept.
        registry.fail = True
        await placer.reload()
        assert {c.id for c in placer.models()} == {"m"}
    finally:
        await placer.aclose()


def test_an_unknown_fallback_profile_stops_startup() -> None:
    cfg = msgspec.structs.replace(Config(), ingress=IngressConfig(fallback_profile="nope"))
    with pytest.raises(ConfigError, match="nope"):
        _placer(FakeRegistry([]), cfg)


PRICE = Price(effective_from_s=1_000, input_nusd_per_token=1, cached_input_nusd_per_token=1,
              output_nusd_per_token=1)


@dataclass
class FakeRedis:
    prices: dict[str, bytes] = field(default_factory=dict)
    reads: int = 0
    fail: bool = False

    async def hget(self, key: str, model: str) -> bytes | None:
        self.reads += 1
        if self.fail:
            raise redis.exceptions.TimeoutError("stopped")
        return self.prices.get(model)


# (model, wall clock, expected error or None)
PRICE_CASES = [
    ("priced", 2_000.0, None),
    ("priced", 999.0, ModelNotPriced),  # its price is not in force yet
    ("served-unpriced", 2_000.0, ModelNotPriced),
    ("nobody-serves", 2_000.0, ModelNotFound),
]


@pytest.mark.parametrize(("model", "wall_s", "error"), PRICE_CASES)
async def test_price_check(model: str, wall_s: float, error: type[Exception] | None) -> None:
    fake = FakeRedis({"priced": msgspec.json.encode((PRICE,))})
    registry = FakeRegistry([ReplicaInfo(id="a", url="u", models=("priced", "served-unpriced"))])
    book = PriceBook(fake, 1.0, registry, clock_s=Clock(),  # type: ignore[arg-type]
                     wall_s=lambda: wall_s)
    if error is None:
        await book.require(model, "t")
    else:
        with pytest.raises(error):
            await book.require(model, "t")


async def test_price_cache_and_redis_away() -> None:
    clock = Clock()
    fake = FakeRedis({"priced": msgspec.json.encode((PRICE,))})
    book = PriceBook(fake, 1.0, FakeRegistry([]),  # type: ignore[arg-type]
                     clock_s=clock, wall_s=lambda: 2_000.0)
    await book.require("priced", "t")
    await book.require("priced", "t")
    assert fake.reads == 1
    clock.now_s += 2.0
    fake.fail = True
    await book.require("priced", "t")  # a stale copy that saw a price is still right
    with pytest.raises(ServiceUnavailable):
        await book.require("never-seen", "t")

