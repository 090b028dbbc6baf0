"""Response bodies and stream chunks in the shapes vLLM's OpenAI server writes.

Chunks carry only the fields vLLM sets on them (it dumps chunks with
exclude_unset); whole responses carry vLLM's null fields too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

Body = dict[str, Any]


@dataclass(frozen=True)
class ResponseContext:
    response_id: str
    created_s: int
    model: str


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> Body:
    """`cached_tokens` None leaves out prompt_tokens_details, as vLLM's per-chunk usage does."""
    usage: Body = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


class ResponseShape(Protocol):
    id_prefix: str

    def opening_chunks(self, ctx: ResponseContext, usage: Body | None) -> list[Body]: ...

    def token_chunk(
        self, ctx: ResponseContext, text: str, finish_reason: str | None, usage: Body | None
    ) -> Body: ...

    def usage_chunk(self, ctx: ResponseContext, usage: Body) -> Body: ...

    def full_response(
        self, ctx: ResponseContext, text: str, finish_reason: str, usage: Body
    ) -> Body: ...


class ChatShape:
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def opening_chunks(self, ctx: ResponseContext, usage: Body | None) -> list[Body]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [_chunk(ctx, self.chunk_object, [choice], usage)]

    def token_chunk(
        self, ctx: ResponseContext, text: str, finish_reason: str | None, usage: Body | None
    ) -> Body:
        choice: Body = {
            "index": 0,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = None
        return _chunk(ctx, self.chunk_object, [choice], usage)

    def usage_chunk(self, ctx: ResponseContext, usage: Body) -> Body:
        return _chunk(ctx, self.chunk_object, [], usage)

    def full_response(
        self, ctx: ResponseContext, text: str, finish_reason: str, usage: Body
    ) -> Body:
        message = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning_content": None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        return _response(ctx, "chat.completion", choice, usage)


class CompletionShape:
    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    def opening_chunks(self, ctx: ResponseContext, usage: Body | None) -> list[Body]:
        return []

    def token_chunk(
        self, ctx: ResponseContext, text: str, finish_reason: str | None, usage: Body | None
    ) -> Body:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        return _chunk(ctx, self.chunk_object, [choice], usage)

    def usage_chunk(self, ctx: ResponseContext, usage: Body) -> Body:
        return _chunk(ctx, self.chunk_object, [], usage)

    def full_response(
        self, ctx: ResponseContext, text: str, finish_reason: str, usage: Body
    ) -> Body:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        return _response(ctx, "text_completion", choice, usage)


def _chunk(
    ctx: ResponseContext, object_type: str, choices: list[Body], usage: Body | None
) -> Body:
    chunk: Body = {
        "id": ctx.response_id,
        "object": object_type,
        "created": ctx.created_s,
        "model": ctx.model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _response(ctx: ResponseContext, object_type: str, choice: Body, usage: Body) -> Body:
    body: Body = {
        "id": ctx.response_id,
        "object": object_type,
        "created": ctx.created_s,
        "model": ctx.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage,
    }
    # Only chat responses have a top-level prompt_logprobs in vLLM.
    if object_type == "chat.completion":
        body["prompt_logprobs"] = None
    body["kv_transfer_params"] = None
    return body
