"""The one typed config: a TOML file decoded into frozen msgspec Structs.

Unknown keys are an error naming the key. Environment variables override
only addresses and secrets (see ENV_OVERRIDES); everything else comes from
the file or the defaults, which run the local stack."""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from scheduler.config_scheduler import DEFAULT_PROFILES as DEFAULT_PROFILES
from scheduler.config_scheduler import CostParams as CostParams
from scheduler.config_scheduler import EjectionConfig as EjectionConfig
from scheduler.config_scheduler import PluginParams as PluginParams
from scheduler.config_scheduler import PrefixApproxParams as PrefixApproxParams
from scheduler.config_scheduler import PrefixPreciseParams as PrefixPreciseParams
from scheduler.config_scheduler import ProfileConfig as ProfileConfig
from scheduler.config_scheduler import SaturationConfig as SaturationConfig
from scheduler.config_scheduler import SchedulerConfig as SchedulerConfig
from scheduler.config_scheduler import ScorerRef as ScorerRef
from scheduler.config_scheduler import SessionAffinityParams as SessionAffinityParams
from scheduler.config_scheduler import _Section
from scheduler.errors import ConfigError
from scheduler.media_urls import check_allowlist
from scheduler.quota_terms import QuotaConfig
from scheduler.webhook_config import WebhooksConfig


class IngressConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    # Processes serving the port (SO_REUSEPORT); 0: one per core, at most 2
    # (router/workers.py: the rest of a local stack needs CPU too).
    workers: int = 0
    max_body_bytes: int = 1 << 20
    placement_timeout_s: float = 2.0
    # How long a placement may wait in the schedulers' fair queue when every
    # replica is saturated (PlaceRequest.max_queue_s); 0: never queue, answer 503.
    max_queue_s: float = 10.0
    # A scheduler actor that has not answered a placement in this long is taken
    # as lost and the placement goes to another actor (answers take < 1 ms).
    placement_attempt_timeout_s: float = 0.3
    # When no scheduler actor can be asked (NATS down, none answering), the
    # ingress places requests itself with this profile (a name under
    # [scheduler.profiles]) over the replica registry and its own in-flight
    # counts; false: those requests get 503 no_capacity.
    fallback_placement: bool = True
    fallback_profile: str = "least-load"
    upstream_connect_timeout_s: float = 5.0
    # Bounds a whole upstream request; generation of long answers is slow.
    upstream_total_timeout_s: float = 600.0
    key_cache_ttl_s: float = 5.0
    default_max_tokens: int = 256
    usage_queue_size: int = 10_000
    # Usage events NATS did not take (away, no ack in time) wait on disk
    # (var_dir/spool/); once it holds this many, requests are refused (503).
    spool_max_events: int = 100_000
    # Prompts are tokenized for precise prefix routing (models.<name>): those
    # up to this size on the event loop (about 1 ms), larger ones on threads.
    tokenize_inline_max_bytes: int = 2_048
    tokenizer_threads: int = 2
    # Hosts whose http(s) media URLs (image_url, ...) replicas may fetch; none:
    # only data: URLs (scheduler/media_urls.py). Never loopback or private ones.
    media_url_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_allowlist(self.media_url_hosts)


class AdminConfig(_Section):
    """The admin API (tenants, keys, prices, audit): its own process, on
    loopback unless told otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8090


class RetriesConfig(_Section):
    """The ingress asks for another replica when the placed one fails before
    the client got a byte (connect error, 5xx, stream dying before its first
    chunk); never after, never on a 4xx."""

    # Attempts per request, the first included.
    max_attempts: int = 2
    # Retry budget, per ingress process: retries in the last window_s may be
    # at most budget_ratio of the requests in it, but min_retries are always allowed.
    budget_ratio: float = 0.2
    budget_min_retries: int = 3
    budget_window_s: float = 10.0


class NatsConfig(_Section):
    url: str = "nats://127.0.0.1:4222"
    usage_stream: str = "YARD_USAGE"
    # JetStream drops a repeated Nats-Msg-Id inside this window.
    duplicate_window_s: float = 120.0
    request_timeout_s: float = 2.0


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    timeout_s: float = 1.0


class RayConfig(_Section):
    # Empty: `switchyard up` starts a local Ray head on loopback.
    address: str = ""
    num_cpus: int = 2
    namespace: str = "switchyard"
    # How often `up` checks its actors; any that does not answer within
    # call_timeout_s is re-created (or attached), after rejoining Ray if it went away.
    supervise_interval_s: float = 1.0
    call_timeout_s: float = 2.0


class AuthConfig(_Section):
    # HMAC key for stored API-key digests; `up` generates one under var/ when empty.
    key_secret: str = ""
    # How long a rotated key keeps working beside its replacement.
    rotation_grace_s: float = 86_400.0


class AgentConfig(_Section):
    """Replica agents: one per replica, scraping it and relaying its KV events."""

    scrape_interval_s: float = 0.25
    health_interval_s: float = 1.0
    # Bounds each GET of /health, /metrics and /kv_event_sources.
    http_timeout_s: float = 1.0
    # Bounds one whole replay from a replica's ROUTER socket.
    replay_timeout_s: float = 1.0
    # KV-event batches received but not yet relayed; beyond it they are dropped
    # (counted), which shows up as a gap and is filled from replay.
    relay_queue_batches: int = 10_000


class ModelConfig(_Section):
    """What switchyard knows of one served model's engine (vLLM's flags), for
    precise prefix routing: the ingress tokenizes prompts and hashes their
    blocks as vLLM does; a replica agent refuses precise scoring for a
    replica whose vllm:cache_config_info disagrees."""

    # Directory with tokenizer.json and tokenizer_config.json (the chat
    # template); empty: no tokenizer, so `prefix-precise` scores this model
    # by the approximate index.
    tokenizer_dir: str = ""
    # vLLM's --block-size.
    block_size_tokens: int = 16
    # vLLM's --prefix-caching-hash-algo: "sha256" or "sha256_cbor".
    prefix_caching_hash_algo: str = "sha256"
    # The PYTHONHASHSEED vLLM runs with (seeds its first block's parent); empty: unset.
    python_hash_seed: str = ""


class ClickHouseConfig(_Section):
    # "chdb": embedded engine at `path` (one process owns it); "http": a server at `url`.
    interface: str = "chdb"
    # Relative paths are under var_dir.
    path: str = "chdb"
    url: str = ""
    database: str = "switchyard"


class MeteringConfig(_Section):
    batch_max: int = 20_000
    # How long one pull request waits for events on the server.
    fetch_wait_s: float = 0.5
    # A batch is stored at most this long after its first event arrived
    # (sooner when full): the ingest lag's bound at low rates.
    linger_s: float = 0.1
    ack_wait_s: float = 30.0
    # An event the store refuses (while it answers) on this many deliveries
    # goes to the dead-letter stream. JetStream itself redelivers without
    # limit, so a store outage never drops usage.
    max_deliver: int = 10
    dead_letter_stream: str = "YARD_USAGE_DLQ"
    clickhouse: ClickHouseConfig = ClickHouseConfig()


class SimulatorConfig(_Section):
    """Simulated vLLM replicas (loadtests/simulator); engine knobs carry vLLM's flag names."""

    replicas: int = 2
    base_port: int = 8100
    model: str = "switchyard-tiny"
    # Model directory with tokenizer.json and tokenizer_config.json; empty:
    # deploy/tiny_model. `up` derives the simulated model's [models] entry from
    # it and the cache knobs below, whose defaults equal ModelConfig's.
    tokenizer_dir: str = ""
    max_model_len: int = 1024
    # One engine step takes decode_ms_per_token (a lone request's inter-token
    # latency), plus batch_ms_per_seq per further decoding sequence, plus its
    # prompt tokens at prefill_tokens_per_s.
    decode_ms_per_token: float = 10.0
    batch_ms_per_seq: float = 0.1
    prefill_tokens_per_s: float = 20_000.0
    # Fixed time before the engine sees a request (vLLM's API server: parsing,
    # tokenization); part of TTFT, not of queue time.
    request_overhead_ms: float = 0.0
    # Multiplies every simulated duration: below 1 runs faster than the model would.
    time_scale: float = 1.0
    block_size_tokens: int = 16
    # KV-cache size in blocks (vLLM's num_gpu_blocks; block 0 is its null block).
    cache_blocks: int = 4_096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2_048
    enable_prefix_caching: bool = True
    # "sha256" or "sha256_cbor", as --prefix-caching-hash-algo.
    prefix_caching_hash_algo: str = "sha256"
    # The PYTHONHASHSEED real vLLM would run with; empty: unset.
    python_hash_seed: str = ""
    # KV-cache events; empty: off. tcp://127.0.0.1:P: each replica's PUB socket
    # connects there (the subscriber binds). With `*` as host, replica i binds
    # 127.0.0.1 at P + i instead.
    kv_events_endpoint: str = ""
    # Topic of replica i; `{index}` is replaced by i.
    kv_events_topic: str = "sim-{index}"
    # tcp://host:port of the replay ROUTER sockets; empty: none. Replica i binds
    # 127.0.0.1 at port + i (port 0: any free port, see GET /kv_event_sources).
    kv_events_replay_endpoint: str = ""
    # False sends full 32-byte digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
    kv_events_int_hashes: bool = True
    seed: int = 0


class ReplicaConfig(_Section):
    url: str
    id: str = ""


class Config(_Section):
    var_dir: str = "var"
    # Of every switchyard process and actor. Prompts and keys are never logged,
    # at any level (tests/test_log_canaries.py runs the stack at debug).
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    ingress: IngressConfig = IngressConfig()
    admin: AdminConfig = AdminConfig()
    retries: RetriesConfig = RetriesConfig()
    nats: NatsConfig = NatsConfig()
    redis: RedisConfig = RedisConfig()
    ray: RayConfig = RayConfig()
    auth: AuthConfig = AuthConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    agent: AgentConfig = AgentConfig()
    metering: MeteringConfig = MeteringConfig()
    quota: QuotaConfig = QuotaConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    # Served model name -> its engine settings; `up` adds the simulated model.
    models: dict[str, ModelConfig] = msgspec.field(default_factory=dict)
    # Static replicas; when empty `up` starts simulated ones.
    replicas: tuple[ReplicaConfig, ...] = ()


def model_config(cfg: Config, model: str) -> ModelConfig:
    """The settings of `model`; the defaults (no tokenizer) when it has none."""
    return cfg.models.get(model, DEFAULT_MODEL)


DEFAULT_MODEL = ModelConfig()

# environment variable -> (section, field); addresses and secrets only.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "SWITCHYARD_NATS_URL": ("nats", "url"),
    "SWITCHYARD_REDIS_URL": ("redis", "url"),
    "SWITCHYARD_RAY_ADDRESS": ("ray", "address"),
    "SWITCHYARD_KEY_SECRET": ("auth", "key_secret"),
    "SWITCHYARD_CLICKHOUSE_URL": ("metering.clickhouse", "url"),
    "SWITCHYARD_WEBHOOK_SECRET": ("webhooks", "secret"),
}


def decode_config(raw: Mapping[str, object], env: Mapping[str, str]) -> Config:
    """Builds the Config from a decoded TOML mapping plus the environment."""
    merged = _with_env(dict(raw), env)
    try:
        return msgspec.convert(merged, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def process_config(prog: str, argv: list[str] | None) -> Config:
    """The config of a service process started as `prog --config PATH`
    (by `switchyard up`, or by hand), with its logging set up."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", type=Path, help="TOML file, or JSON written by `up`")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, os.environ)
    configure_logging(cfg)
    return cfg


def configure_logging(cfg: Config) -> None:
    """Logs to stderr at `cfg.log_level` (also when a handler is already set)."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(cfg.log_level.upper())


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Reads the TOML file at `path` (defaults only when None). A `.json`
    file is a config written by `switchyard up` for its children: it is
    already complete, so the environment is not applied again."""
    if path is None:
        return decode_config({}, env)
    try:
        if path.suffix == ".json":
            return config_from_json(path.read_bytes())
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, msgspec.DecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return decode_config(raw, env)


def _with_env(raw: dict[str, object], env: Mapping[str, str]) -> dict[str, object]:
    for var, (section_path, field) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        node = raw
        for part in section_path.split("."):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"invalid config: `{part}` must be a table")
            node = child
        node[field] = env[var]
    return raw


def dump_config(config: Config) -> bytes:
    """Serialises the config for child processes (they decode it again)."""
    return msgspec.json.encode(config)


def config_from_json(data: bytes) -> Config:
    return msgspec.json.decode(data, type=Config)
