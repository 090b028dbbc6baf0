"""The saturation detector: is a replica too loaded to take more work now?

A replica is saturated when its waiting queue reaches `waiting_requests` or
its KV cache is `kv_cache_usage` full (llm-d's utilization detector). The
queue is estimated at decision time, not only from the last load report, so
a burst saturates the fleet before any report arrives:

- once a replica reported a waiting queue, it is at its batch (or KV) limit,
  so everything placed on it since that report waits as well;
- with no queue reported, placements since the report first fill the free
  batch slots (`max_num_seqs` - running) and wait only beyond them;
- requests in flight here beyond `max_num_seqs` wait whatever any report
  said (this covers replicas without an agent, which never report).

Placements since the report count only while in flight: a completion notice
frees its slot at once, and a replica that never reports (no agent, so
`placed_since_report` only grows) is not saturated forever.
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.config import SaturationConfig
from scheduler.framework import ReplicaView


def waiting_estimate(replica: ReplicaView, max_num_seqs: int) -> int:
    """Requests waiting at `replica` now, as best known at decision time."""
    since = min(replica.placed_since_report, replica.in_flight_requests)
    if replica.waiting > 0:
        reported = replica.waiting + since
    else:
        reported = max(0, replica.running + since - max_num_seqs)
    return max(reported, replica.in_flight_requests - max_num_seqs)


def is_saturated(replica: ReplicaView, cfg: SaturationConfig) -> bool:
    return (waiting_estimate(replica, cfg.max_num_seqs) >= cfg.waiting_requests
            or replica.kv_cache_usage >= cfg.kv_cache_usage)


def all_saturated(replicas: Iterable[ReplicaView], cfg: SaturationConfig) -> bool:
    """True when every replica given is saturated (and at least one is given)."""
    seen = False
    for replica in replicas:
        if not is_saturated(replica, cfg):
            return False
        seen = True
    return seen
