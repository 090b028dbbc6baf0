"""One real vLLM replica (the CPU build from `make vllm`) serving the tiny
model with dummy weights, as a child process on 127.0.0.1: its argv and
environment, start() until /health answers, stop() by PID.

KV-cache events: vLLM's PUB socket CONNECTS to a `tcp://127.0.0.1:P`
endpoint, so the subscriber binds it and many replicas share it, told apart
by topic. The replay ROUTER socket is always BOUND by vLLM (in its engine
process), so each replica needs its own loopback replay port.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import msgspec

from deploy.procs import LOOPBACK, ChildProcess, StartFailed, child_env
from deploy.replica_fleet import healthy
from deploy.tiny_model import TINY_MODEL_DIR

PROJECT_DIR = Path(__file__).resolve().parent.parent
VLLM_PYTHON = PROJECT_DIR / "var" / "vllm" / "venv" / "bin" / "python"
SERVED_MODEL = "switchyard-tiny"
# 30-40 s alone here; about 140 s when two replicas start at once.
STARTUP_TIMEOUT_S = 240.0
# Any explicit KV-cache size skips the CPU worker's start-up check that 92 % of
# the memory node is free (it fails whenever other processes use memory). It
# need only be free: --num-gpu-blocks-override alone sets the cache's size.
KV_CACHE_MEMORY_BYTES = 64 * 2**20
# A graceful shutdown stops the engine process too; SIGKILL after this.
STOP_TIMEOUT_S = 30.0


class KvEventsTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where a replica publishes KV-cache events: `endpoint` is bound by the
    subscriber, `replay_endpoint` by vLLM (both `tcp://127.0.0.1:<port>`)."""

    endpoint: str
    topic: str
    replay_endpoint: str

    def config_json(self) -> str:
        return json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint, "topic": self.topic})


class VllmReplicaSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One replica's settings. `cpu_core` pins its OpenMP threads; `work_dir`
    holds its temporary files, caches and RPC sockets."""

    port: int
    cpu_core: int
    work_dir: Path
    kv_blocks: int = 128
    block_size_tokens: int = 32
    max_model_len_tokens: int = 1024
    kv_events: KvEventsTarget | None = None
    # vLLM's own defaults when None.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def vllm_installed() -> bool:
    return VLLM_PYTHON.exists()


def vllm_argv(spec: VllmReplicaSpec) -> list[str]:
    # X-Request-Id needs no flag: vLLM takes it as the request id (response
    # `id` is `chatcmpl-<id>` / `cmpl-<id>`); the flag echoes it back.
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(TINY_MODEL_DIR), "--served-model-name", SERVED_MODEL,
        "--host", LOOPBACK, "--port", str(spec.port),
        "--dtype", "float32", "--load-format", "dummy", "--enforce-eager",
        "--block-size", str(spec.block_size_tokens),
        "--max-model-len", str(spec.max_model_len_tokens),
        "--num-gpu-blocks-override", str(spec.kv_blocks),
        "--kv-cache-memory-bytes", str(KV_CACHE_MEMORY_BYTES),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--enable-request-id-headers",
    ]
    if spec.kv_events is not None:
        argv += ["--kv-events-config", spec.kv_events.config_json()]
    if spec.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(spec.max_num_batched_tokens)]
    return argv


def work_dirs(spec: VllmReplicaSpec) -> dict[str, Path]:
    """The replica's scratch directories, by the variable that points there."""
    return {name: spec.work_dir / sub for name, sub in [
        ("TMPDIR", "tmp"), ("VLLM_RPC_BASE_PATH", "rpc"), ("VLLM_CACHE_ROOT", "cache"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor")]}


def vllm_env(spec: VllmReplicaSpec) -> dict[str, str]:
    return child_env(
        VLLM_HOST_IP=LOOPBACK, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1",
        VLLM_CPU_OMP_THREADS_BIND=str(spec.cpu_core),
        **{name: str(path) for name, path in work_dirs(spec).items()})


class VllmReplica:
    """A running replica; start() returns once it answers /health."""

    def __init__(self, spec: VllmReplicaSpec, log_path: Path) -> None:
        self.spec = spec
        self.proc = ChildProcess(f"vllm replica :{spec.port}", vllm_argv(spec), log_path,
                                 env=vllm_env(spec))

    async def start(self) -> None:
        if not vllm_installed():
            raise StartFailed(f"vLLM not installed at {VLLM_PYTHON}: run `make vllm`")
        for path in work_dirs(self.spec).values():
            path.mkdir(parents=True, exist_ok=True)
        await self.proc.start()
        health_url = self.spec.url + "/health"
        async with aiohttp.ClientSession() as session:
            await self.proc.wait_ready(lambda: healthy(session, health_url), STARTUP_TIMEOUT_S)

    async def stop(self) -> None:
        await self.proc.stop(timeout_s=STOP_TIMEOUT_S)
