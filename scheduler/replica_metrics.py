"""What a replica agent reads from vLLM's /metrics, and whether the replica's
KV cache is laid out the way precise prefix scoring assumes.

The parser reads the Prometheus text format line by line and looks only at
the few series it needs; everything else costs one prefix test per line.
Values are summed over label sets (data-parallel engines, models).
"""

from __future__ import annotations

import re

import msgspec

from scheduler.config import ModelConfig
from scheduler.wire import ReplicaCacheConfig

CACHE_CONFIG_INFO = "vllm:cache_config_info"
# Series name -> ReplicaMetrics field. Older vLLM called the usage gauge gpu_cache_usage_perc.
_SUMMED = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries_tokens",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits_tokens",
}
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
# Hash algorithms whose block hashes a router can reproduce (xxhash seeds per process).
REPRODUCIBLE_HASH_ALGOS = ("sha256", "sha256_cbor")


class ReplicaMetrics(msgspec.Struct, kw_only=True):
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries_tokens: int = 0
    prefix_cache_hits_tokens: int = 0
    cache: ReplicaCacheConfig | None = None


def parse_metrics(text: str) -> ReplicaMetrics:
    """Reads the series the agent needs from a /metrics body; ignores the rest."""
    sums: dict[str, float] = {}
    cache: ReplicaCacheConfig | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        name = line[:brace] if brace >= 0 else line.split(" ", 1)[0]
        if name == CACHE_CONFIG_INFO and cache is None:
            cache = _cache_config(line[brace:line.rfind("}")])
            continue
        field = _SUMMED.get(name)
        if field is None:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        sums[field] = sums.get(field, 0.0) + value
    return ReplicaMetrics(
        running=int(sums.get("running", 0)),
        waiting=int(sums.get("waiting", 0)),
        kv_cache_usage=sums.get("kv_cache_usage", 0.0),
        prefix_cache_queries_tokens=int(sums.get("prefix_cache_queries_tokens", 0)),
        prefix_cache_hits_tokens=int(sums.get("prefix_cache_hits_tokens", 0)),
        cache=cache,
    )


def _cache_config(labels_text: str) -> ReplicaCacheConfig:
    labels = dict(_LABEL.findall(labels_text))
    return ReplicaCacheConfig(
        block_size_tokens=_int(labels.get("block_size", "")),
        num_gpu_blocks=_int(labels.get("num_gpu_blocks", "")),
        # vLLM renders the CacheConfig with str(): "True" / "False".
        enable_prefix_caching=labels.get("enable_prefix_caching", "") == "True",
        prefix_caching_hash_algo=labels.get("prefix_caching_hash_algo", ""),
    )


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def precise_mode_error(cache: ReplicaCacheConfig | None, model: str,
                       settings: ModelConfig) -> str:
    """Why this replica's KV events cannot feed a precise prefix index ("" when
    they can): block hashes the ingress computes for `model` with `settings`
    would never match its own."""
    if cache is None:
        return f"replica reports no {CACHE_CONFIG_INFO}: cannot check its block size"
    if not cache.enable_prefix_caching:
        return "prefix caching is off on the replica (--enable-prefix-caching)"
    if cache.block_size_tokens != settings.block_size_tokens:
        return (f"replica block size is {cache.block_size_tokens} tokens, switchyard is "
                f"configured for {settings.block_size_tokens} "
                f"(models.{model}.block_size_tokens)")
    if cache.prefix_caching_hash_algo != settings.prefix_caching_hash_algo:
        return (f"replica hashes blocks with {cache.prefix_caching_hash_algo!r}, switchyard "
                f"with {settings.prefix_caching_hash_algo!r} "
                f"(models.{model}.prefix_caching_hash_algo; vLLM's --prefix-caching-hash-algo, "
                f"one of {', '.join(REPRODUCIBLE_HASH_ALGOS)})")
    return ""
