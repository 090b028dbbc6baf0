"""Every message that crosses NATS (and the replica registry in Redis), with
the subjects beside them (the quota calls in `quota.py`, re-exported here;
the usage API's in `usage.py`).
JSON via msgspec; encoders/decoders built once. New fields always get
defaults so old and new peers interoperate."""

from __future__ import annotations

import re

import msgspec

from scheduler.wire.base import _Msg
from scheduler.wire.quota import QuotaCall as QuotaCall
from scheduler.wire.quota import QuotaCommit as QuotaCommit
from scheduler.wire.quota import QuotaLeaseReturn as QuotaLeaseReturn
from scheduler.wire.quota import QuotaRelease as QuotaRelease
from scheduler.wire.quota import QuotaReply as QuotaReply
from scheduler.wire.quota import QuotaReserve as QuotaReserve

# --- subjects ---------------------------------------------------------------

# Placement requests for one model, served by scheduler actors in a queue group.
PLACE_SUBJECT = "yard.sched.place.{model}"
PLACE_QUEUE = "yard-sched"
# Completion notices; every scheduler actor hears every notice.
DONE_SUBJECT = "yard.sched.done"
# "Which models can be served?", answered by any scheduler actor.
MODELS_SUBJECT = "yard.sched.models"
# Placements made by one scheduler actor, heard by its peers so that every
# actor counts every in-flight request (and learns the same prefixes).
PEER_PLACED_SUBJECT = "yard.sched.placed"
# An ingress saw a replica fail before the first byte: every scheduler actor
# ejects it for a while.
REPLICA_FAILED_SUBJECT = "yard.replica.failed"
# Replica registry changed: scheduler actors reload it from Redis.
REGISTRY_CHANGED_SUBJECT = "yard.registry.changed"
# A control-plane record changed (ControlChanged): every ingress evicts it
# from its key cache.
CONTROL_CHANGED_SUBJECT = "yard.control.changed"
# Usage events (JetStream); the tenant id is the last token.
USAGE_SUBJECT = "yard.usage.{tenant}"
USAGE_SUBJECTS = "yard.usage.>"
# Usage events the metering consumer could never store (UsageDeadLetter),
# kept in their own stream; outside yard.usage.> so the usage stream does not take them.
USAGE_DEAD_LETTER_SUBJECT = "yard.deadletter.usage"
# Usage totals, answered by the metering actor that owns ClickHouse.
USAGE_QUERY_SUBJECT = "yard.analytics.usage"
# Usage rows grouped by model/key/time bucket (UsageRowsQuery) and a statement's
# usage per model and price period (StatementQuery), answered by the same actor.
USAGE_ROWS_SUBJECT = "yard.analytics.usage.rows"
STATEMENT_SUBJECT = "yard.analytics.statement"
# Budget alerts (JetStream, the webhook's alert stream); the tenant id is the last token.
ALERT_SUBJECT = "yard.alerts.budget.{tenant}"
ALERT_SUBJECTS = "yard.alerts.>"
# Webhook events given up on (JetStream, its dead-letter stream), by event type.
DEAD_WEBHOOK_SUBJECT = "yard.webhook.dead.{kind}"
# The public subject API for internal services (served by ingress nodes).
API_SUBJECTS = {
    "yard.v1.chat.completions": "chat",
    "yard.v1.completions": "completions",
}
API_QUEUE = "yard-ingress"

# Redis hash holding the replica registry: replica id -> ReplicaInfo JSON.
REGISTRY_KEY = "sy:replicas"
# Redis set of replica ids removed by an operator: their agents stop re-registering them.
REMOVED_KEY = "sy:replicas:removed"
# Load snapshots of a model's replicas, from their agents, several times a second.
LOAD_SUBJECT = "yard.replica.load.{model}"
# A replica's KV-cache events (KvEventsRelay) and resync notices (KvResync), in
# order on one subject so a scheduler sees a resync exactly where it happened.
KV_SUBJECT = "yard.kv.{model}.{replica}"
# Quota calls for the tenants hashed onto one shard (quota_terms.shard_of);
# exactly one quota shard actor serves each.
QUOTA_SUBJECT = "yard.quota.{shard}"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/:]")


def subject_token(name: str) -> str:
    """Escapes a name (a model like `org/llama-3.1`) into one subject token."""
    return _UNSAFE.sub(lambda m: "%" + m.group().encode().hex().upper(), name)


def place_subject(model: str) -> str:
    return PLACE_SUBJECT.format(model=subject_token(model))


def usage_subject(tenant_id: str) -> str:
    return USAGE_SUBJECT.format(tenant=subject_token(tenant_id))


def load_subject(model: str) -> str:
    return LOAD_SUBJECT.format(model=subject_token(model))


def quota_subject(shard: int) -> str:
    return QUOTA_SUBJECT.format(shard=shard)


def kv_subject(model: str, replica_id: str) -> str:
    return KV_SUBJECT.format(model=subject_token(model), replica=subject_token(replica_id))


# --- placement ---------------------------------------------------------------


class PlaceRequest(_Msg, tag="place"):
    request_id: str
    tenant_id: str
    model: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    # Routing features computed by the ingress (the prompt itself never
    # travels): vLLM block hashes (low 64 bits) when it tokenized the prompt,
    # chained hashes of the prompt's byte chunks, the client's session.
    block_hashes: tuple[int, ...] = ()
    chunk_hashes: tuple[int, ...] = ()
    session_id: str = ""
    # Higher is served first when every replica is saturated; negative is
    # sheddable. Already bounded by what the tenant may use.
    priority: int = 0
    # How long the request may wait in a fair queue for a replica; 0: not at all.
    max_queue_s: float = 0.0
    # Replicas that already failed this request (retries before the first byte).
    exclude: tuple[str, ...] = ()
    attempt: int = 1


class PlaceQueued(_Msg, tag="place_queued"):
    """Interim answer: the request waits in a fair queue (every replica is
    saturated); the final Placement or PlaceRejected follows on the same
    reply subject within `max_queue_s`."""

    request_id: str


class PeerPlaced(_Msg, tag="peer_placed"):
    """A placement made by scheduler actor `actor_id`, broadcast to its peers."""

    actor_id: str
    request_id: str
    tenant_id: str
    model: str
    replica_id: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    # So the peers learn the same prefixes (pending precise ones, approximate ones).
    block_hashes: tuple[int, ...] = ()
    chunk_hashes: tuple[int, ...] = ()
    session_id: str = ""
    # A retry (attempt 2, its failed replica excluded) moves the count.
    attempt: int = 1


class ReplicaFailed(_Msg, tag="replica_failed"):
    """A replica failed a request before its first byte (connection refused,
    reset, 5xx, timeout); `reason` in words."""

    replica_id: str
    request_id: str
    reason: str


class Placement(_Msg, tag="placement"):
    request_id: str
    replica_id: str
    url: str


class PlaceRejected(_Msg, tag="place_rejected"):
    request_id: str
    code: str
    message: str
    retry_after_s: float | None = None


class PlaceDone(_Msg, tag="done"):
    request_id: str
    replica_id: str
    model: str


class ModelsQuery(_Msg, tag="models_query"):
    pass


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    replicas: int = 0


class ModelsReply(_Msg, tag="models"):
    models: tuple[ModelCard, ...] = ()


PlaceReply = Placement | PlaceRejected | PlaceQueued
SchedMessage = PlaceRequest | PlaceDone | ModelsQuery


# --- replica registry ----------------------------------------------------------


class ReplicaInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    url: str
    models: tuple[str, ...]
    # Set by `switchyard replicas drain`: no new placements, in-flight ones finish.
    draining: bool = False


class RegistryChanged(_Msg, tag="registry_changed"):
    pass


# --- control plane ---------------------------------------------------------------


class ControlChanged(msgspec.Struct, frozen=True, kw_only=True):
    """Published after a committed control-store mutation. Not part of the
    commit: a subscriber that misses it still sees the change once its
    cached copy expires. Untagged (its own subject; `kind` is its field)."""

    kind: str  # "key" | "tenant" | "price"
    # The key id, tenant id or model.
    id: str
    # The control store's global version after the change.
    version: int = 0


# --- replica agents ------------------------------------------------------------


class ReplicaCacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A replica's KV-cache layout, from the labels of `vllm:cache_config_info`."""

    block_size_tokens: int = 0
    num_gpu_blocks: int = 0
    enable_prefix_caching: bool = False
    prefix_caching_hash_algo: str = ""


class LoadSnapshot(_Msg, tag="load"):
    """One scrape of a replica's /metrics plus its health, from its agent.
    `precise_error` non-empty: the replica's KV events must not feed a precise
    prefix index (why, in words: cache-config mismatch, events off); the agent
    then relays no events, so the precise index holds nothing for it."""

    replica_id: str
    model: str
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    prefix_cache_queries_tokens: int = 0
    prefix_cache_hits_tokens: int = 0
    healthy: bool = False
    draining: bool = False
    cache: ReplicaCacheConfig | None = None
    precise_error: str = ""
    taken_at_ms: int = 0


class KvEventsRelay(_Msg, tag="kv"):
    """One vLLM KV-event batch, relayed verbatim: `payload` is the msgpack
    EventBatch (scheduler.kv_events.decode_batch), so the agent never decodes
    or re-encodes events; `seq` is the replica publisher's sequence number."""

    replica_id: str
    model: str
    seq: int
    payload: bytes
    replayed: bool = False


class KvResync(_Msg, tag="kv_resync"):
    """Drop everything known about this replica's KV cache: the events before
    `next_seq` are lost (`reason`: "agent_start", "restart", "gap",
    "cache_config")."""

    replica_id: str
    model: str
    reason: str
    next_seq: int = 0


KvMessage = KvEventsRelay | KvResync


# --- metering ----------------------------------------------------------------


class UsageEvent(_Msg, tag="usage"):
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    replica_id: str = ""
    route: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    latency_ms: float = 0.0
    status: int = 200
    error_code: str = ""
    started_at_ms: int = 0
    # The request's priority (x-priority, within the tenant's range).
    priority: int = 0
    # The client's max_tokens; 0: it gave none (the replica's context bounds it).
    max_tokens: int = 0
    # Published only for requests a replica accepted, so always True on the
    # wire; kept so a stored row says so.
    billable: bool = True


class UsageQuery(_Msg, tag="usage_query"):
    tenant_id: str | None = None


class UsageTotal(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class UsageReply(_Msg, tag="usage_totals"):
    totals: tuple[UsageTotal, ...] = ()
    error: str = ""


class UsageDeadLetter(_Msg, tag="usage_dead_letter"):
    """A usage stream message the consumer gave up on, verbatim in `payload`."""

    reason: str
    subject: str
    stream_seq: int
    deliveries: int = 1
    payload: bytes = b""


# The usage API's and the webhook's messages are in usage.py.


# --- public NATS subject API ----------------------------------------------------


class ApiChunk(_Msg, tag="chunk"):
    """One streamed chunk: `data` is the OpenAI chunk object, verbatim."""

    data: msgspec.Raw


class ApiResponse(_Msg, tag="response"):
    """The whole answer of a non-streaming request."""

    data: msgspec.Raw


class ApiEnd(_Msg, tag="end"):
    """Ends a stream (the SSE `[DONE]`)."""


class ApiError(_Msg, tag="error"):
    status: int
    error: dict[str, str | None]
    # When to try again (HTTP's Retry-After, not rounded up to whole seconds).
    retry_after_s: float | None = None
    # The HTTP headers the same error has: OpenAI's x-ratelimit-* on a 429.
    headers: dict[str, str] = msgspec.field(default_factory=dict)


ApiReply = ApiChunk | ApiResponse | ApiEnd | ApiError

# --- codecs ----------------------------------------------------------------------

encode = msgspec.json.Encoder().encode
sched_decoder = msgspec.json.Decoder(SchedMessage)
place_request_decoder = msgspec.json.Decoder(PlaceRequest)
place_reply_decoder = msgspec.json.Decoder(PlaceReply)
done_decoder = msgspec.json.Decoder(PlaceDone)
models_reply_decoder = msgspec.json.Decoder(ModelsReply)
peer_placed_decoder = msgspec.json.Decoder(PeerPlaced)
replica_failed_decoder = msgspec.json.Decoder(ReplicaFailed)
replica_decoder = msgspec.json.Decoder(ReplicaInfo)
load_decoder = msgspec.json.Decoder(LoadSnapshot)
kv_decoder = msgspec.json.Decoder(KvMessage)
usage_decoder = msgspec.json.Decoder(UsageEvent)
usage_query_decoder = msgspec.json.Decoder(UsageQuery)
usage_reply_decoder = msgspec.json.Decoder(UsageReply)
usage_dead_letter_decoder = msgspec.json.Decoder(UsageDeadLetter)
api_reply_decoder = msgspec.json.Decoder(ApiReply)
control_changed_decoder = msgspec.json.Decoder(ControlChanged)
quota_call_decoder = msgspec.json.Decoder(QuotaCall)
quota_reply_decoder = msgspec.json.Decoder(QuotaReply)
