"""The replica agent's pure parts: reading vLLM's /metrics, checking the
cache config for precise mode, and classifying KV-event sequence numbers."""

from __future__ import annotations

import pytest

from scheduler.config import ModelConfig
from scheduler.kv_sequence import KvSequence, Verdict, contiguous_tail
from scheduler.replica_metrics import parse_metrics, precise_mode_error
from scheduler.wire import ReplicaCacheConfig

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1024.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",\
engine="0",num_gpu_blocks="4096",prefix_caching_hash_algo="sha256_cbor"} 1.0
process_cpu_seconds_total 12.0
"""
GOOD = ReplicaCacheConfig(block_size_tokens=16, num_gpu_blocks=4096,
                          enable_prefix_caching=True, prefix_caching_hash_algo="sha256_cbor")
SETTINGS = ModelConfig(block_size_tokens=16, prefix_caching_hash_algo="sha256_cbor")


def test_metrics_are_read_and_summed_over_engines() -> None:
    m = parse_metrics(METRICS)
    assert (m.running, m.waiting, m.kv_cache_usage) == (5, 4, 0.25)
    assert (m.prefix_cache_queries_tokens, m.prefix_cache_hits_tokens) == (1024, 512)
    assert m.cache == GOOD


def test_a_body_without_vllm_series_reads_as_empty() -> None:
    m = parse_metrics("# nothing\nprocess_cpu_seconds_total 1.0\ngarbage\n")
    assert (m.running, m.waiting, m.cache) == (0, 0, None)


@pytest.mark.parametrize(("cache", "expected"), [
    (GOOD, ""),
    (None, "no vllm:cache_config_info"),
    (ReplicaCacheConfig(block_size_tokens=16, enable_prefix_caching=False,
                        prefix_caching_hash_algo="sha256_cbor"), "prefix caching is off"),
    (ReplicaCacheConfig(block_size_tokens=32, enable_prefix_caching=True,
                        prefix_caching_hash_algo="sha256_cbor"),
     "block size is 32 tokens, switchyard is configured for 16 (models.m.block_size_tokens)"),
    (ReplicaCacheConfig(block_size_tokens=16, enable_prefix_caching=True,
                        prefix_caching_hash_algo="xxhash"), "'xxhash'"),
])
def test_precise_mode_needs_the_configured_cache_layout(cache: ReplicaCacheConfig | None,
                                                         expected: str) -> None:
    error = precise_mode_error(cache, "m", SETTINGS)
    assert (error == "") if not expected else (expected in error)


def test_an_algorithm_not_configured_is_refused_even_if_reproducible() -> None:
    sha256 = ModelConfig(block_size_tokens=16, prefix_caching_hash_algo="sha256")
    assert "'sha256_cbor', switchyard with 'sha256'" in precise_mode_error(GOOD, "m", sha256)


@pytest.mark.parametrize(("seen", "seq", "verdict"), [
    ([], 0, Verdict.NEXT),
    ([], 3, Verdict.GAP),
    ([0, 1], 2, Verdict.NEXT),
    ([0, 1], 5, Verdict.GAP),
    ([0, 1, 2], 0, Verdict.RESTART),
    ([0, 1, 2], 1, Verdict.RESTART),
])
def test_sequence_numbers_are_classified(seen: list[int], seq: int, verdict: Verdict) -> None:
    sequence = KvSequence()
    for s in seen:
        sequence.advance(s)
    assert sequence.classify(seq) is verdict


@pytest.mark.parametrize(("seqs", "end", "first"), [
    ([3, 4, 5], 6, 3),
    ([3, 5], 6, 5),
    ([], 6, 6),
    ([3, 4], 6, 6),
])
def test_a_partial_replay_contributes_its_contiguous_tail(seqs: list[int], end: int,
                                                          first: int) -> None:
    assert contiguous_tail(seqs, end) == first
