"""A replica's /metrics, named and labelled as vLLM's Prometheus logger does.

The replica keeps plain counters and histograms (ReplicaStats); a collector
renders them at scrape time into a registry of the replica's own, so several
replicas can share one process. Counters and histograms carry `_created`
series (the replica's start time) like vLLM's prometheus_client metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# Bucket bounds as in vLLM's PrometheusStatLogger.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
ENGINE_INDEX = "0"
_LABEL_NAMES = ["model_name", "engine"]
_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)
_COUNTERS = (
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "Number of generation tokens processed."),
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
)
_HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
)


class Histogram:
    """Bucket counts and a sum; cumulative only when rendered."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets


@dataclass
class ReplicaStats:
    """What the replica's shell counts as tokens reach the responses."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0)
    )
    ttft_s: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    inter_token_s: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS_S))
    e2e_s: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS_S))
    queue_s: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS_S))


class EngineGauges(NamedTuple):
    """What the engine core reports at scrape time."""

    num_running: int
    num_waiting: int
    kv_cache_usage_perc: float
    num_preemptions: int
    prefix_cache_queries_tokens: int
    prefix_cache_hits_tokens: int


@dataclass(frozen=True)
class CacheInfo:
    block_size_tokens: int
    num_gpu_blocks: int
    enable_prefix_caching: bool
    prefix_caching_hash_algo: str


class ReplicaCollector(Collector):
    def __init__(
        self,
        model: str,
        stats: ReplicaStats,
        read_gauges: Callable[[], EngineGauges],
        cache: CacheInfo,
        created_s: float,
    ) -> None:
        self._labels = [model, ENGINE_INDEX]
        self._stats = stats
        self._read_gauges = read_gauges
        self._cache = cache
        self._created_s = created_s

    def collect(self) -> Iterator[Metric]:
        engine = self._read_gauges()
        yield from self._gauges(engine)
        yield from self._counters(engine)
        yield from self._histograms()
        yield self._cache_config_info()

    def _gauges(self, engine: EngineGauges) -> Iterator[Metric]:
        values = (engine.num_running, engine.num_waiting, engine.kv_cache_usage_perc)
        for (name, doc), value in zip(_GAUGES, values, strict=True):
            yield self._with_value(GaugeMetricFamily(name, doc, labels=_LABEL_NAMES), value)

    def _counters(self, engine: EngineGauges) -> Iterator[Metric]:
        stats = self._stats
        values = (
            engine.prefix_cache_queries_tokens,
            engine.prefix_cache_hits_tokens,
            stats.prompt_tokens,
            stats.generation_tokens,
            engine.num_preemptions,
        )
        for (name, doc), value in zip(_COUNTERS, values, strict=True):
            family = CounterMetricFamily(name, doc, labels=_LABEL_NAMES)
            family.add_metric(self._labels, value, created=self._created_s)
            yield family
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*_LABEL_NAMES, "finished_reason"],
        )
        for reason, count in stats.finished_requests.items():
            success.add_metric([*self._labels, reason], count, created=self._created_s)
        yield success

    def _histograms(self) -> Iterator[Metric]:
        stats = self._stats
        histograms = (stats.ttft_s, stats.inter_token_s, stats.e2e_s, stats.queue_s)
        for (name, doc), histogram in zip(_HISTOGRAMS, histograms, strict=True):
            family = HistogramMetricFamily(name, doc, labels=_LABEL_NAMES)
            family.add_metric(self._labels, histogram.cumulative_buckets(), histogram.sum)
            labels = dict(zip(_LABEL_NAMES, self._labels, strict=True))
            family.samples.append(Sample(f"{name}_created", labels, self._created_s))
            yield family

    def _cache_config_info(self) -> Metric:
        # vLLM renders CacheConfig values with str(), hence "True" and "auto".
        info = {
            "block_size": str(self._cache.block_size_tokens),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(self._cache.enable_prefix_caching),
            "engine": ENGINE_INDEX,
            "num_gpu_blocks": str(self._cache.num_gpu_blocks),
            "prefix_caching_hash_algo": self._cache.prefix_caching_hash_algo,
        }
        family = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(info)
        )
        family.add_metric(list(info.values()), 1.0)
        return family

    def _with_value(self, family: GaugeMetricFamily, value: float) -> Metric:
        family.add_metric(self._labels, value)
        return family
