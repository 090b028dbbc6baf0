"""Prometheus metrics of one scheduler actor, on its own loopback port.

Read at scrape time from the service's counters and the core's index sizes,
so placing a request costs nothing extra. Every bounded structure (prefix
indexes, sessions, in-flight placements, fair queues) shows its size here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Operators scrape it from the node; nothing outside the machine should reach it.
LOOPBACK = "127.0.0.1"
# Reads a name -> value snapshot.
Stats = Callable[[], Mapping[str, int]]


class SchedulerCollector(Collector):
    def __init__(self, actor: str, events: Stats, sizes: Stats) -> None:
        self._actor = actor
        self._events = events
        self._sizes = sizes

    def collect(self) -> Iterator[Metric]:
        counters = CounterMetricFamily("switchyard_scheduler_events",
                                       "Scheduler events, by kind.", labels=["actor", "kind"])
        sizes = GaugeMetricFamily("switchyard_scheduler_size",
                                  "Sizes of the scheduler's bounded state, by part.",
                                  labels=["actor", "part"])
        for name, value in sorted(self._events().items()):
            counters.add_metric([self._actor, name], value)
        for name, value in sorted(self._sizes().items()):
            sizes.add_metric([self._actor, name], value)
        yield counters
        yield sizes


async def serve_metrics(actor: str, events: Stats, sizes: Stats, port: int) -> web.AppRunner:
    """Serves GET /metrics on 127.0.0.1:`port`; the caller cleans the runner up."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SchedulerCollector(actor, events, sizes))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
