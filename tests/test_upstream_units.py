"""The hot path's byte handling: usage cut out of a chunk, and the body sent
upstream built without decoding and encoding the client's fields again."""

from __future__ import annotations

import msgspec
import pytest

from router.requests import parse_request
from router.upstream import strip_usage

CHOICE = b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]'


@pytest.mark.parametrize("payload", [
    # vLLM's layout: usage last, compact.
    b'{"id":"a",' + CHOICE + b',"usage":{"prompt_tokens":5,"total_tokens":6,'
    b'"completion_tokens":1}}',
    b'{"id":"a",' + CHOICE + b',"usage":{"prompt_tokens":5,"total_tokens":6,'
    b'"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}}',
    b'{"id":"a","choices":[],"usage":{"prompt_tokens":5,"prompt_tokens_details":null,'
    b'"total_tokens":6}}',
    # Two objects side by side, one nested twice, usage not last.
    b'{"id":"a","choices":[],"usage":{"a":{"b":1},"d":{"e":2}},"x":1}',
    b'{"id":"a","choices":[],"usage":{"a":{"b":{"c":1}},"d":2}}',
    # Other layouts: decoded and encoded again.
    b'{"id":"a","usage":{"prompt_tokens":1},' + CHOICE + b'}',
    b'{"id":"a", "usage": {"prompt_tokens": 1}, ' + CHOICE + b'}',
    b'{"id":"a",' + CHOICE + b'}',
])
def test_strip_usage(payload: bytes) -> None:
    expected = msgspec.json.decode(payload)
    expected.pop("usage", None)
    stripped = strip_usage(payload)
    assert msgspec.json.decode(stripped) == expected
    assert b'"usage"' not in stripped


def test_chunk_without_usage_is_passed_as_is() -> None:
    payload = b'{"id":"a",' + CHOICE + b'}'
    assert strip_usage(payload) is payload


@pytest.mark.parametrize(("stream", "max_tokens"), [(False, None), (True, None), (True, 7)])
def test_upstream_body_copies_the_clients_fields(stream: bool, max_tokens: int | None) -> None:
    # Written as no encoder would write them again: spaces, escapes, a float's zeros.
    body = (b'{"model": "m", "temperature": 0.70, "messages": [{"role": "user", '
            b'"content": "caf\\u00e9 \\"quoted\\""}], "top_p": 1.0, "cache_salt": "theirs", '
            b'"stream": ' + (b"true" if stream else b"false") + b'}')
    parsed = parse_request("chat", body, "tenant-salt", max_tokens_cap=max_tokens or 0,
                           default_max_tokens=max_tokens or 0)
    upstream = parsed.upstream_body
    assert b'"temperature":0.70' in upstream and b'"top_p":1.0' in upstream
    assert b'[{"role": "user", "content": "caf\\u00e9 \\"quoted\\""}]' in upstream
    sent = msgspec.json.decode(upstream)
    assert sent["cache_salt"] == "tenant-salt"
    assert sent["stream"] is True  # a non-streaming request goes as a stream (assembled)
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent.get("max_tokens") == max_tokens
