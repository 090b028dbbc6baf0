"""Validation of OpenAI request bodies: decode only what routing, limits and
metering need (msgspec), and pass everything else through untouched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

import msgspec

from router.assemble import ASSEMBLY_FIELDS, can_assemble
from scheduler.errors import InvalidRequest
from scheduler.media_urls import check_messages

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# Rough characters per token, for the placement estimate only (metering
# always uses the replica's own counts).
CHARS_PER_TOKEN = 4
# A completion's max_tokens when it gives none (OpenAI's and vLLM's default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatBody(msgspec.Struct, frozen=True):
    model: str
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    user: str | None = None
    # Read for the prompt's token ids, as vLLM renders the template.
    add_generation_prompt: bool = True


class CompletionBody(msgspec.Struct, frozen=True):
    model: str
    # A string, or a batch: strings, token ids, or lists of token ids.
    prompt: str | list[str | int | list[int]]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    user: str | None = None


# Fields some clients use to pick a server. Replicas are chosen by
# switchyard alone: a request naming one is refused, never forwarded.
UPSTREAM_URL_FIELDS = ("api_base", "base_url", "api_url", "endpoint", "upstream_url")

_raw_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
# A content given as a list of parts, in a chat body's raw `messages`.
_CONTENT_LIST = re.compile(rb'"content"\s*:\s*\[')
_UNICODE_ESCAPE = re.compile(rb"\\u")
# The top-level fields whose values the upstream body depends on.
_READ_FIELDS = ("max_completion_tokens", "stream_options", *ASSEMBLY_FIELDS)

_decoders = {
    "chat": msgspec.json.Decoder(ChatBody),
    "completions": msgspec.json.Decoder(CompletionBody),
}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    route: str
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens_est: int
    upstream_body: bytes
    # The prompt as bytes in a canonical form, for prefix hashing: a longer
    # conversation starts with the bytes of a shorter one.
    prompt_bytes: bytes
    user: str
    # The decoded body, for tokenizing the prompt (precise prefix routing).
    body: ChatBody | CompletionBody
    # The tenant's, sent upstream in place of any the client chose; vLLM
    # hashes it into the prompt's first KV block.
    cache_salt: str = ""
    # The client asked for usage on every chunk (else the ingress strips it).
    continuous_usage: bool = False
    # A non-streaming request sent upstream as a stream (router/assemble.py).
    assembled: bool = False


def parse_request(route: str, body: bytes, cache_salt: str = "", default_max_tokens: int = 0,
                  max_tokens_cap: int = 0, media_url_hosts: tuple[str, ...] = ()) -> ParsedRequest:
    """Validates `body` for `route` ("chat" or "completions"); the body sent
    upstream carries `cache_salt` (the tenant's) and no other salt, and media
    URLs only a replica may fetch (`media_url_hosts`: the allowlist).

    `default_max_tokens` (0: none) is a chat request's max_tokens when it
    gives none (a completion's is OpenAI's 16); `max_tokens_cap` (0: none)
    bounds it. The result is what the body sent upstream says, so the quota
    reserved on it bounds what the replica may generate."""
    try:
        parsed = _decoders[route].decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc), param=_param_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not parsed.model:
        raise InvalidRequest("`model` must not be empty.", param="model")
    stream = bool(parsed.stream)
    include_usage = bool(stream and parsed.stream_options and parsed.stream_options.include_usage)
    continuous_usage = bool(include_usage and parsed.stream_options
                            and parsed.stream_options.continuous_usage_stats)
    if parsed.stream_options is not None and not stream:
        raise InvalidRequest("`stream_options` is only allowed when `stream` is true.",
                             param="stream_options")
    asked = parsed.max_tokens
    if isinstance(parsed, ChatBody):
        asked = parsed.max_completion_tokens or asked
    max_tokens = asked
    if asked is None and default_max_tokens:
        max_tokens = (default_max_tokens if isinstance(parsed, ChatBody)
                      else COMPLETIONS_DEFAULT_MAX_TOKENS)
    if max_tokens is not None and max_tokens_cap:
        max_tokens = min(max_tokens, max_tokens_cap)
    upstream_body, assembled = _upstream_body(body, stream, cache_salt,
                                              None if max_tokens == asked else max_tokens,
                                              media_url_hosts)
    return ParsedRequest(route=route, model=parsed.model, stream=stream,
                         include_usage=include_usage, max_tokens=max_tokens,
                         prompt_tokens_est=_estimate_tokens(parsed),
                         upstream_body=upstream_body,
                         prompt_bytes=_prompt_bytes(parsed), user=parsed.user or "",
                         body=parsed, cache_salt=cache_salt,
                         continuous_usage=continuous_usage, assembled=assembled)


def _upstream_body(body: bytes, stream: bool, cache_salt: str, max_tokens: int | None,
                   media_url_hosts: tuple[str, ...]) -> tuple[bytes, bool]:
    """The body sent upstream, and whether a non-streaming request goes as a
    stream (to be assembled). Streams ask the replica for usage on every
    chunk (`continuous_usage_stats`), so a stream cut short still has the
    replica's own counts; the ingress strips what the client did not ask
    for. The client's `cache_salt` is replaced by the tenant's (or dropped).
    `max_tokens`: set in place of the client's (None: left as it is).

    Top-level fields stay undecoded (msgspec.Raw): the prompt and everything
    else the ingress does not change are copied as the client wrote them."""
    raw = _raw_fields.decode(body)
    for name in UPSTREAM_URL_FIELDS:
        if name in raw:
            raise InvalidRequest(f"`{name}` is not accepted: switchyard chooses the replica.",
                                 param=name)
    messages = raw.get("messages")
    if messages is not None and _may_hold_parts(messages):
        check_messages(msgspec.json.decode(messages), media_url_hosts)
    read = {name: msgspec.json.decode(raw[name]) for name in _READ_FIELDS if name in raw}
    fields: dict[str, object] = dict(raw)
    if max_tokens is not None:
        # The field the replica reads first (vLLM: max_completion_tokens, then max_tokens).
        fields["max_completion_tokens" if read.get("max_completion_tokens") else "max_tokens"] = (
            max_tokens)
    fields.pop("cache_salt", None)
    if cache_salt:
        fields["cache_salt"] = cache_salt
    assembled = not stream and can_assemble(read)
    if stream or assembled:
        fields["stream"] = True
        fields["stream_options"] = {**(read.get("stream_options") or {}),
                                    "include_usage": True, "continuous_usage_stats": True}
    return msgspec.json.encode(fields), assembled


def _may_hold_parts(messages: msgspec.Raw) -> bool:
    """Whether some message's content may be a list of parts (where media
    URLs live): only then are the messages decoded for the URL check. A
    \\u escape could spell the key `content`, so one decodes them too."""
    return (_CONTENT_LIST.search(messages) is not None
            or _UNICODE_ESCAPE.search(messages) is not None)


def _estimate_tokens(parsed: ChatBody | CompletionBody) -> int:
    if isinstance(parsed, CompletionBody):
        prompt = parsed.prompt
        if isinstance(prompt, str):
            return len(prompt) // CHARS_PER_TOKEN + 1
        return sum(_item_tokens(p) for p in prompt)
    chars = 0
    for message in parsed.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
        elif message.content:
            chars += sum(len(part.text or "") for part in message.content)
    return chars // CHARS_PER_TOKEN + len(parsed.messages)


def _prompt_bytes(parsed: ChatBody | CompletionBody) -> bytes:
    if isinstance(parsed, CompletionBody):
        prompt = parsed.prompt
        return prompt.encode() if isinstance(prompt, str) else msgspec.json.encode(prompt)
    parts = []
    for message in parsed.messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        parts.append(f"{message.role}\x00{content or ''}\x00")
    return "".join(parts).encode()


def _item_tokens(item: str | int | list[int]) -> int:
    if isinstance(item, int):
        return 1
    if isinstance(item, list):
        return len(item)
    return len(item) // CHARS_PER_TOKEN + 1


def _param_of(message: str) -> str | None:
    # msgspec says "... - at `$.messages[0].role`"; OpenAI's `param` is the path.
    marker = "at `$."
    if marker not in message:
        return None
    return message.split(marker, 1)[1].rstrip("`")
