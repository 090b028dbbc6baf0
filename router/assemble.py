"""One non-streaming answer assembled from a stream.

The ingress asks the replica for a stream with continuous usage even when
the client wants one JSON answer, so a client that leaves while the replica
generates is billed for the tokens generated so far (the replica's own
count, on every chunk); a non-streaming upstream call aborted midway tells
nothing. The body is written in vLLM 0.32's non-streaming shape: fields a
stream does not carry are the constants vLLM writes (null), in its order.
Requests whose answer a stream cannot reproduce exactly (n > 1, logprobs,
tools, echo, ...) are not converted (`can_assemble`)."""

from __future__ import annotations

from typing import Any

import msgspec

# Fields that make a non-streaming answer carry more than text per choice.
_NOT_ASSEMBLED = ("logprobs", "top_logprobs", "prompt_logprobs", "tools", "functions",
                  "tool_choice", "function_call", "echo", "best_of", "return_token_ids",
                  "return_tokens_as_token_ids")


# Every field can_assemble reads.
ASSEMBLY_FIELDS = ("n", *_NOT_ASSEMBLED)


def can_assemble(raw: dict[str, Any]) -> bool:
    """Whether a non-streaming request's answer can be assembled from its
    stream; `raw` holds at least its ASSEMBLY_FIELDS."""
    if raw.get("n") not in (None, 1):
        return False
    return not any(raw.get(name) not in (None, False) for name in _NOT_ASSEMBLED)


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _Chunk(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[_Choice] = []
    system_fingerprint: str | None = None
    usage: dict[str, Any] | None = None


_chunk = msgspec.json.Decoder(_Chunk)


class Assembler:
    """Feed it each chunk's payload; `body()` is the answer once the stream ended."""

    def __init__(self, route: str) -> None:
        self._chat = route == "chat"
        self._id = ""
        self._created = 0
        self._model = ""
        self._fingerprint: str | None = None
        self._parts: list[str] = []
        self._reasoning: list[str] = []
        self._finish_reason: str | None = None
        self._stop_reason: str | int | None = None
        self._usage: dict[str, Any] | None = None

    def add(self, payload: bytes) -> None:
        chunk = _chunk.decode(payload)
        self._id, self._created, self._model = chunk.id, chunk.created, chunk.model
        if chunk.system_fingerprint is not None:
            self._fingerprint = chunk.system_fingerprint
        if chunk.usage is not None and not chunk.choices:
            self._usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content if choice.delta is not None else choice.text
            if text:
                self._parts.append(text)
            if choice.delta is not None and choice.delta.reasoning:
                self._reasoning.append(choice.delta.reasoning)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
                self._stop_reason = choice.stop_reason

    def body(self) -> bytes:
        text = "".join(self._parts)
        if self._chat:
            message = {"role": "assistant", "content": text, "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       "reasoning": "".join(self._reasoning) or None}
            choice: dict[str, Any] = {
                "index": 0, "message": message, "logprobs": None,
                "finish_reason": self._finish_reason, "stop_reason": self._stop_reason,
                "token_ids": None, "routed_experts": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": self._finish_reason, "stop_reason": self._stop_reason,
                      "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                      "routed_experts": None}
        body: dict[str, Any] = {
            "id": self._id, "object": "chat.completion" if self._chat else "text_completion",
            "created": self._created, "model": self._model, "choices": [choice],
            "service_tier": None, "system_fingerprint": self._fingerprint,
            "usage": _full_usage(self._usage)}
        if self._chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return msgspec.json.encode(body)


def _full_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """The final usage chunk's counts with the null fields vLLM's full answer adds."""
    if usage is None:
        return None
    details = usage.get("prompt_tokens_details")
    full = {"prompt_tokens": usage.get("prompt_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "prompt_tokens_details": None if details is None else {
                "cached_tokens": details.get("cached_tokens"),
                "created_cache_tokens": details.get("created_cache_tokens"),
                "multimodal_tokens": details.get("multimodal_tokens")},
            "completion_tokens_details": usage.get("completion_tokens_details")}
    return full
