"""The media URL policy (scheduler/media_urls.py): data: URLs pass; http(s)
only to allowlisted public hosts, in every form a URL parser reads an address
in; every other scheme, and every place in a content part a replica may read
a URL from, refused with the field named."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from router.requests import parse_request
from scheduler.config import ConfigError, decode_config
from scheduler.errors import InvalidRequest
from scheduler.media_urls import blocked_host, check_allowlist, url_refusal

ALLOWED = ("images.example.com", "8.8.8.8", "2001:4860:4860::8888")
PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(("url", "refused_because"), [
    (PNG, None),
    ("data:audio/wav;base64,UklGRg==", None),
    ("https://images.example.com/cat.png", None),
    ("http://images.example.com./cat.png", None),
    ("HTTPS://IMAGES.EXAMPLE.COM/cat.png", None),
    ("  \thttps://images.example.com/cat.png", None),
    ("http://8.8.8.8/x.png", None),
    ("http://[2001:4860:4860::8888]/x.png", None),
    ("https://other.example.com/cat.png", "not on ingress.media_url_hosts"),
    ("https://images.example.com.evil.io/", "not on ingress.media_url_hosts"),
    ("http://1.1.1.1/", "not on ingress.media_url_hosts"),
    ("file:///etc/passwd", "file: URLs"),
    ("FILE:/etc/passwd", "file: URLs"),
    ("ftp://images.example.com/x", "ftp: URLs"),
    ("gopher://127.0.0.1:6379/_INFO", "gopher: URLs"),
    ("c:\\x.png", "c: URLs"),
    ("http://127.0.0.1:4222/", "not a public host"),
    ("http://localhost:8080/", "not a public host"),
    ("http://LocalHost./", "not a public host"),
    ("http://api.localhost/", "not a public host"),
    ("http://169.254.169.254/latest/meta-data/", "not a public host"),
    ("http://metadata.google.internal/computeMetadata/v1/", "not a public host"),
    ("http://100.100.100.200/latest/meta-data/", "not a public host"),
    ("http://10.0.0.7/", "not a public host"),
    ("http://192.168.1.1/", "not a public host"),
    ("http://0.0.0.0:8080/", "not a public host"),
    ("http://2130706433/", "not a public host"),
    ("http://0x7f000001/", "not a public host"),
    ("http://0x7f.1/", "not a public host"),
    ("http://0177.0.0.1/", "not a public host"),
    ("http://127.1/", "not a public host"),
    ("http://2852039166/", "not a public host"),  # 169.254.169.254
    ("http://08.1.1.1/", "not a public host"),  # not octal, not an address
    ("http://[::1]:8080/", "not a public host"),
    ("http://[::ffff:127.0.0.1]/", "not a public host"),
    ("http://[::ffff:7f00:1]/", "not a public host"),
    ("http://[::127.0.0.1]/", "not a public host"),
    ("http://[64:ff9b::a9fe:a9fe]/", "not a public host"),
    ("http://[2002:7f00:1::]/", "not a public host"),
    ("http://[fe80::1%25eth0]/", "not a public host"),
    ("http://[fd00:ec2::254]/", "not a public host"),
    ("http://%31%32%37.0.0.1/", "not a public host"),
    ("http://ⓛocalhost/", "not a public host"),
    ("http://images.example.com@127.0.0.1/", "credentials"),
    ("http://user:pw@images.example.com/", "credentials"),
    ("http://127.0.0.1\\@images.example.com/", "credentials"),
    ("http://images.example.com:0/", "port 0"),
    ("http://images.example.com:99999/", "cannot be parsed"),
    ("http://[::1/", "cannot be parsed"),
])
def test_url_policy(url: str, refused_because: str | None) -> None:
    refusal = url_refusal(url, ALLOWED)
    if refused_because is None:
        assert refusal is None
    else:
        assert refusal is not None and refused_because in refusal


@pytest.mark.parametrize(("host", "blocked"), [
    ("images.example.com", False),
    ("8.8.8.8", False),
    ("134744072", False),  # 8.8.8.8 as one number: still an address, still public
    ("127.0.0.1", True),
    ("127.255.255.254", True),
    ("0x7F.0.0.1", True),
    ("1.2.3.4.5", True),
    ("4294967296", True),  # past 32 bits: no address, no name
    ("under_score.example", True),
    ("::1", True),
    ("::", True),
    ("ff02::1", True),
])
def test_blocked_hosts(host: str, blocked: bool) -> None:
    assert blocked_host(host) is blocked


def _chat(*parts: Any, message: dict[str, Any] | None = None) -> bytes:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
                                      message or {"role": "user", "content": list(parts)}]
    return msgspec.json.encode({"model": "m", "messages": messages})


CANARY = "http://127.0.0.1:9/canary"


@pytest.mark.parametrize(("body", "param"), [
    (_chat({"type": "image_url", "image_url": {"url": CANARY}}),
     "messages[1].content[0].image_url.url"),
    (_chat({"type": "text", "text": "see"}, {"type": "image_url", "image_url": CANARY}),
     "messages[1].content[1].image_url"),
    (_chat({"type": "input_image", "image_url": CANARY}), "messages[1].content[0].image_url"),
    (_chat({"type": "audio_url", "audio_url": {"url": "file:///etc/shadow"}}),
     "messages[1].content[0].audio_url.url"),
    (_chat({"type": "video_url", "video_url": {"url": "http://169.254.169.254/"}}),
     "messages[1].content[0].video_url.url"),
    (_chat({"type": "input_audio", "input_audio": {"data": CANARY, "format": "wav"}}),
     "messages[1].content[0].input_audio.data"),
    (_chat({"type": "file", "file": {"file_data": "file:///etc/passwd", "filename": "a.pdf"}}),
     "messages[1].content[0].file.file_data"),
    # vLLM reads a part with a uuid by its media keys, whatever its type says.
    (_chat({"type": "text", "text": "hi", "uuid": "u1", "image_url": CANARY}),
     "messages[1].content[0].image_url"),
    (_chat({"type": "future_media", "sources": [{"href": CANARY}]}),
     "messages[1].content[0].sources[0].href"),
])
def test_urls_in_message_content_are_refused_with_their_field(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request("chat", body, "salt", media_url_hosts=ALLOWED)
    assert caught.value.param == param and caught.value.status == 400
    assert caught.value.type == "invalid_request_error" and param in caught.value.message


@pytest.mark.parametrize("body", [
    _chat({"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}}),
    _chat({"type": "image_url", "image_url": {"url": "https://images.example.com/a.png"}}),
    _chat({"type": "input_audio", "input_audio": {"data": "//uQxAAAAAAA", "format": "mp3"}}),
    _chat({"type": "text", "text": "fetch http://127.0.0.1:9/ and file:///etc/passwd"}),
    _chat({"type": "file", "file": {"file_id": "file:abc", "filename": "c:report.pdf"}}),
    _chat(message={"role": "user", "content": "http://169.254.169.254/ is a text here"}),
])
def test_inline_media_text_and_allowlisted_urls_pass(body: bytes) -> None:
    parsed = parse_request("chat", body, "salt", media_url_hosts=ALLOWED)
    sent = msgspec.json.decode(parsed.upstream_body)["messages"]
    assert sent == msgspec.json.decode(body)["messages"]


def test_without_an_allowlist_only_data_urls_pass() -> None:
    ok = _chat({"type": "image_url", "image_url": {"url": PNG}})
    assert parse_request("chat", ok).upstream_body
    with pytest.raises(InvalidRequest):
        parse_request("chat", _chat({"type": "image_url",
                                     "image_url": {"url": "https://images.example.com/a"}}))


@pytest.mark.parametrize(("hosts", "valid"), [
    ([], True),
    (["images.example.com", "8.8.8.8"], True),
    (["Images.example.com"], False),
    (["images.example.com."], False),
    (["localhost"], False),
    (["127.0.0.1"], False),
    (["169.254.169.254"], False),
    (["metadata.google.internal"], False),
    (["::ffff:10.0.0.1"], False),
])
def test_the_allowlist_is_checked_at_startup(hosts: list[str], valid: bool) -> None:
    raw = {"ingress": {"media_url_hosts": hosts}}
    if valid:
        assert decode_config(raw, {}).ingress.media_url_hosts == tuple(hosts)
        check_allowlist(tuple(hosts))
    else:
        with pytest.raises(ConfigError, match="media_url_hosts"):
            decode_config(raw, {})
