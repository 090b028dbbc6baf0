"""Real vLLM replicas (CPU build, the tiny model with dummy weights) for the
tests marked `vllm`: two of them, started once per session one after the
other (start-ups run in parallel take four times as long on 2 cores), each
pinned to its own core, with prefix caching and KV-cache events on. The
events of both go to one SUB socket bound here, told apart by topic.

Tests marked `vllm` are skipped only when `make vllm` has not built the venv.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from deploy.procs import LOOPBACK, free_port
from deploy.vllm import VLLM_PYTHON, KvEventsTarget, VllmReplica, VllmReplicaSpec, vllm_installed
from loadtests.kv_event_sink import KvEventSink

REPLICA_CORES = (0, 1)
# Small enough that eviction (BlockRemoved) happens in tests; 33 is the least
# that holds one max-length (1024-token) request.
KV_BLOCKS = 128


@dataclass(frozen=True)
class VllmReplicas:
    specs: tuple[VllmReplicaSpec, ...]
    kv_events: KvEventSink

    @property
    def urls(self) -> list[str]:
        return [spec.url for spec in self.specs]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vllm_installed():
        return
    skip = pytest.mark.skip(reason=f"real vLLM not installed ({VLLM_PYTHON} missing): make vllm")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


def _spec(index: int, core: int, session_dir: Path, sink_endpoint: str) -> VllmReplicaSpec:
    kv_events = KvEventsTarget(endpoint=sink_endpoint, topic=f"vllm-{index}",
                               replay_endpoint=f"tcp://{LOOPBACK}:{free_port()}")
    return VllmReplicaSpec(port=free_port(), cpu_core=core, kv_blocks=KV_BLOCKS,
                           work_dir=session_dir / f"vllm-{index}", kv_events=kv_events)


@pytest_asyncio.fixture(scope="session")
async def vllm_replicas(session_dir: Path) -> AsyncIterator[VllmReplicas]:
    sink = KvEventSink()
    await sink.start()
    replicas: list[VllmReplica] = []
    try:
        for index, core in enumerate(REPLICA_CORES):
            spec = _spec(index, core, session_dir, sink.endpoint)
            replica = VllmReplica(spec, session_dir / "logs" / f"vllm-{index}.log")
            replicas.append(replica)
            await replica.start()
        yield VllmReplicas(tuple(r.spec for r in replicas), sink)
    finally:
        for replica in reversed(replicas):
            await replica.stop()
        await sink.aclose()
