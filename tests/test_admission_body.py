"""The max_tokens a request is admitted on is the one its replica gets:
defaulted (chat: ingress.default_max_tokens; completions: OpenAI's 16),
clamped to the tenant's cap, and written into the upstream body only when
it differs from what the client sent (the body always goes upstream
re-encoded: the tenant's salt, continuous usage)."""

from __future__ import annotations

import msgspec
import pytest

from router.requests import parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(("route", "body", "default", "cap", "admitted", "upstream"), [
    # route, client fields, default, cap -> max_tokens, upstream fields (None: body as sent)
    ("chat", {}, 256, 0, 256, {"max_tokens": 256}),
    ("chat", {"max_tokens": 10}, 256, 0, 10, None),
    ("chat", {"max_tokens": 1000}, 256, 100, 100, {"max_tokens": 100}),
    ("chat", {}, 256, 100, 100, {"max_tokens": 100}),
    ("chat", {"max_completion_tokens": 500}, 256, 100, 100,
     {"max_completion_tokens": 100}),
    ("chat", {"max_completion_tokens": 50, "max_tokens": 1000}, 256, 100, 50, None),
    ("chat", {}, 0, 0, None, None),
    ("completions", {}, 256, 0, 16, {"max_tokens": 16}),
    ("completions", {"max_tokens": 300}, 256, 200, 200, {"max_tokens": 200}),
    ("completions", {"max_tokens": 3}, 256, 200, 3, None),
])
def test_max_tokens_is_defaulted_clamped_and_sent_upstream(
        route: str, body: dict[str, object], default: int, cap: int, admitted: int | None,
        upstream: dict[str, object] | None) -> None:
    raw = msgspec.json.encode({**(CHAT if route == "chat" else COMPLETION), **body})
    parsed = parse_request(route, raw, "", default, cap)
    assert parsed.max_tokens == admitted
    sent = msgspec.json.decode(parsed.upstream_body)
    assert sent["model"] == "m"
    fields = ("max_tokens", "max_completion_tokens")
    if upstream is None:
        # The client's own fields, untouched.
        assert {name: sent.get(name) for name in fields} == {name: body.get(name)
                                                             for name in fields}
    else:
        assert {name: sent.get(name) for name in upstream} == upstream
