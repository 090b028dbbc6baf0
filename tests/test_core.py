"""Unit tests of the pure parts: config, placement, wire messages, API keys,
request validation. Table-driven, with an injected clock and rng."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from router.requests import parse_request
from scheduler import apikeys
from scheduler.config import Config, config_from_json, decode_config, dump_config, load_config
from scheduler.errors import AuthenticationFailed, ConfigError, InvalidRequest
from scheduler.wire import (
    ApiChunk,
    ApiEnd,
    ApiError,
    ApiResponse,
    KvEventsRelay,
    KvResync,
    LoadSnapshot,
    ModelCard,
    ModelsReply,
    PlaceDone,
    Placement,
    PlaceRejected,
    PlaceRequest,
    ReplicaCacheConfig,
    ReplicaInfo,
    UsageEvent,
    UsageQuery,
    UsageReply,
    UsageTotal,
    api_reply_decoder,
    encode,
    kv_decoder,
    kv_subject,
    load_decoder,
    load_subject,
    place_reply_decoder,
    place_subject,
    replica_decoder,
    sched_decoder,
    usage_decoder,
    usage_query_decoder,
    usage_reply_decoder,
)

# --- config -------------------------------------------------------------------


def test_defaults_run_the_local_stack_on_loopback() -> None:
    cfg = decode_config({}, {})
    assert cfg.ingress.host == "127.0.0.1" and cfg.ingress.port == 8080
    assert "127.0.0.1" in cfg.nats.url and "127.0.0.1" in cfg.redis.url


@pytest.mark.parametrize(("raw", "names"), [
    ({"ingress": {"prot": 1}}, "prot"),
    ({"nope": {}}, "nope"),
    ({"metering": {"clickhouse": {"paht": "x"}}}, "paht"),
])
def test_unknown_keys_are_errors_naming_the_key(raw: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        decode_config(raw, {})


def test_wrong_types_are_errors_with_the_path() -> None:
    with pytest.raises(ConfigError, match=r"\$\.ingress\.port"):
        decode_config({"ingress": {"port": "eighty"}}, {})


def test_environment_overrides_only_addresses_and_secrets() -> None:
    env = {"SWITCHYARD_NATS_URL": "nats://127.0.0.1:1", "SWITCHYARD_KEY_SECRET": "s",
           "SWITCHYARD_CLICKHOUSE_URL": "http://127.0.0.1:8123",
           "SWITCHYARD_INGRESS_PORT": "9"}
    cfg = decode_config({"nats": {"usage_stream": "X"}}, env)
    assert cfg.nats.url == "nats://127.0.0.1:1" and cfg.nats.usage_stream == "X"
    assert cfg.auth.key_secret == "s"
    assert cfg.metering.clickhouse.url == "http://127.0.0.1:8123"
    assert cfg.ingress.port == 8080


def test_config_round_trips_for_child_processes() -> None:
    cfg = decode_config({"replicas": [{"url": "http://127.0.0.1:1"}]}, {})
    assert config_from_json(dump_config(cfg)) == cfg
    assert isinstance(cfg, Config)


# --- wire messages ------------------------------------------------------------------

WIRE_CASES = [
    (PlaceRequest(request_id="r", tenant_id="t", model="m", prompt_tokens=3, max_tokens=4),
     sched_decoder),
    (PlaceRequest(request_id="r", tenant_id="t", model="m", block_hashes=(2**64 - 1, 7),
                  chunk_hashes=(1, 2), session_id="s"), sched_decoder),
    (PlaceDone(request_id="r", replica_id="a", model="m"), sched_decoder),
    (Placement(request_id="r", replica_id="a", url="http://127.0.0.1:1"), place_reply_decoder),
    (PlaceRejected(request_id="r", code="no_capacity", message="x", retry_after_s=1.5),
     place_reply_decoder),
    (UsageEvent(request_id="r", tenant_id="t", key_id="k", model="m", prompt_tokens=1,
                cached_tokens=0, completion_tokens=2, ttft_ms=1.5, status=200), usage_decoder),
    (UsageQuery(tenant_id=None), usage_query_decoder),
    (UsageReply(totals=(UsageTotal(tenant_id="t", requests=1, prompt_tokens=2, cached_tokens=0,
                                   completion_tokens=3),)), usage_reply_decoder),
    (ApiEnd(), api_reply_decoder),
    (ApiError(status=404, error={"message": "m", "type": "t", "param": None, "code": "c"}),
     api_reply_decoder),
    (ApiError(status=429, error={"message": "m", "type": "requests", "param": None, "code": "c"},
              retry_after_s=0.25, headers={"x-ratelimit-limit-requests": "1"}),
     api_reply_decoder),
    (ReplicaInfo(id="a", url="http://127.0.0.1:1", models=("m",)), replica_decoder),
    (ReplicaInfo(id="a", url="http://127.0.0.1:1", models=("m",), draining=True),
     replica_decoder),
    (LoadSnapshot(replica_id="a", model="m", running=2, waiting=1, kv_cache_usage=0.5,
                  prefix_cache_queries_tokens=64, prefix_cache_hits_tokens=32, healthy=True,
                  cache=ReplicaCacheConfig(block_size_tokens=16, num_gpu_blocks=256,
                                           enable_prefix_caching=True,
                                           prefix_caching_hash_algo="sha256"),
                  precise_error="", taken_at_ms=1_700_000_000_000), load_decoder),
    (LoadSnapshot(replica_id="a", model="m", precise_error="block size"), load_decoder),
    (KvEventsRelay(replica_id="a", model="m", seq=7, payload=b"\x93\x00\xff", replayed=True),
     kv_decoder),
    (KvResync(replica_id="a", model="m", reason="gap", next_seq=9), kv_decoder),
]


@pytest.mark.parametrize(("message", "decoder"), WIRE_CASES,
                         ids=[type(m).__name__ for m, _ in WIRE_CASES])
def test_wire_messages_round_trip(message: object, decoder: msgspec.json.Decoder) -> None:
    assert decoder.decode(encode(message)) == message


def test_raw_chunks_are_embedded_verbatim() -> None:
    chunk = b'{"id":"x","choices":[]}'
    for kind in (ApiChunk, ApiResponse):
        decoded = api_reply_decoder.decode(encode(kind(data=msgspec.Raw(chunk))))
        assert isinstance(decoded, kind) and bytes(decoded.data) == chunk


def test_models_reply_and_subject_escaping() -> None:
    reply = ModelsReply(models=(ModelCard(id="org/llama-3.1", replicas=2),))
    assert msgspec.json.decode(encode(reply), type=ModelsReply) == reply
    assert place_subject("org/llama-3.1") == "yard.sched.place.org/llama-3%2E1"
    assert place_subject("a b*>") == "yard.sched.place.a%20b%2A%3E"
    assert load_subject("org/llama-3.1") == "yard.replica.load.org/llama-3%2E1"
    assert kv_subject("m.1", "r.0") == "yard.kv.m%2E1.r%2E0"


def test_registry_entries_of_older_peers_are_not_draining() -> None:
    old = b'{"id":"a","url":"http://127.0.0.1:1","models":["m"]}'
    assert replica_decoder.decode(old).draining is False


# --- API keys ---------------------------------------------------------------------------


def test_keys_round_trip_and_store_only_a_digest() -> None:
    issued = apikeys.issue(b"server-secret")
    parsed = apikeys.parse(issued.plaintext)
    assert parsed.key_id == issued.key_id
    assert apikeys.matches(b"server-secret", parsed, issued.digest)
    assert not apikeys.matches(b"other-secret", parsed, issued.digest)
    assert parsed.secret not in issued.digest and issued.hint == issued.plaintext[-4:]
    assert len(parsed.secret) * 5 >= 256  # base32: 5 bits a character


@pytest.mark.parametrize("mutate", [
    lambda k: k[:-1] + ("a" if k[-1] != "a" else "b"),   # checksum
    lambda k: k[:20] + ("a" if k[20] != "a" else "b") + k[21:],  # secret typo
    lambda k: "sk-" + k[3:],
    lambda k: k + "x",
    lambda k: "",
])
def test_mistyped_keys_fail_the_checksum(mutate) -> None:
    with pytest.raises(AuthenticationFailed):
        apikeys.parse(mutate(apikeys.issue(b"s").plaintext))


# --- request validation -------------------------------------------------------------------


CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def test_stream_without_usage_asks_the_replica_for_usage_on_every_chunk() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"x":1}'
    parsed = parse_request("chat", body)
    assert parsed.stream and not parsed.include_usage and not parsed.continuous_usage
    upstream = msgspec.json.decode(parsed.upstream_body)
    assert upstream["stream_options"] == CONTINUOUS and upstream["x"] == 1


@pytest.mark.parametrize(("options", "include", "continuous"), [
    ({"include_usage": True}, True, False),
    ({"include_usage": True, "continuous_usage_stats": True}, True, True),
    ({"include_usage": False, "continuous_usage_stats": True}, False, False),
])
def test_what_the_client_asked_of_usage_is_kept_apart(options, include, continuous) -> None:
    body = msgspec.json.encode({"model": "m", "prompt": "p", "stream": True,
                                "stream_options": options})
    parsed = parse_request("completions", body)
    assert (parsed.include_usage, parsed.continuous_usage) == (include, continuous)
    assert msgspec.json.decode(parsed.upstream_body)["stream_options"] == CONTINUOUS


def test_non_streaming_request_goes_upstream_as_a_stream_to_assemble() -> None:
    body = b'{"model":"m","prompt":"hello world","max_tokens":3}'
    parsed = parse_request("completions", body)
    upstream = msgspec.json.decode(parsed.upstream_body)
    assert parsed.assembled and not parsed.stream and parsed.max_tokens == 3
    assert upstream == {"model": "m", "prompt": "hello world", "max_tokens": 3,
                        "stream": True, "stream_options": CONTINUOUS}


@pytest.mark.parametrize("extra", [{"n": 2}, {"logprobs": 2}, {"echo": True},
                                   {"tools": [{"type": "function"}]}])
def test_answers_a_stream_cannot_reproduce_go_upstream_as_asked(extra) -> None:
    body = msgspec.json.encode({"model": "m", "prompt": "hello", **extra})
    parsed = parse_request("completions", body)
    upstream = msgspec.json.decode(parsed.upstream_body)
    assert not parsed.assembled and "stream" not in upstream and "stream_options" not in upstream


@pytest.mark.parametrize(("route", "body", "param"), [
    ("chat", b'{"model":"m","messages":[]}', "messages"),
    ("chat", b'{"model":"m","messages":[{"role":1}]}', "messages[0].role"),
    ("chat", b'{"model":"m","messages":[{"role":"u"}],"max_tokens":-1}', "max_tokens"),
    ("chat", b'{"model":"","messages":[{"role":"u"}]}', "model"),
    ("chat", b'{"model":"m","messages":[{"role":"u"}],"stream_options":{}}', "stream_options"),
    ("completions", b'{"model":"m","prompt":{"a":1}}', "prompt"),
    ("completions", b"[]", None),
    ("completions", b"\xff\xfe", None),
])
def test_bad_requests_are_400_with_the_param(route: str, body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(route, body)
    assert caught.value.status == 400 and caught.value.param == param


def test_example_config_documents_the_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "switchyard.example.toml"
    assert load_config(example, {}) == decode_config({}, {})


def test_prompt_bytes_of_a_longer_conversation_start_with_the_shorter() -> None:
    turn = [{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}]
    longer = [*turn, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    short = parse_request("chat", msgspec.json.encode({"model": "m", "messages": turn}))
    long = parse_request("chat", msgspec.json.encode({"model": "m", "messages": longer,
                                                      "user": "u1"}))
    assert long.prompt_bytes.startswith(short.prompt_bytes) and long.user == "u1"
    assert parse_request("completions", b'{"model":"m","prompt":"abc"}').prompt_bytes == b"abc"
