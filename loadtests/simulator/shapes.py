"""Response bodies and stream chunks exactly as vLLM 0.32's OpenAI server writes
them (checked against tests/data/vllm_samples, captured from real vLLM run
with --enable-prompt-tokens-details).

Chunks carry only the fields vLLM sets on them (it dumps chunks with
exclude_unset, the final usage chunk also with exclude_none); whole responses
carry vLLM's null fields too. Chat and completions differ in small ways
(created_cache_tokens, the role chunk, per-chunk usage), kept here as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Body = dict[str, Any]


@dataclass(frozen=True)
class ResponseContext:
    response_id: str
    created_s: int
    model: str
    system_fingerprint: str
    # With include_usage the usage chunk ends the stream and carries the
    # fingerprint; without it the chunk with the finish reason does.
    include_usage: bool = False


@dataclass(frozen=True)
class UsageCounts:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Prompt tokens this request wrote to the prefix cache (full blocks beyond its hit).
    created_cache_tokens: int


def _usage(counts: UsageCounts, completion_tokens: int | None = None) -> Body:
    done = counts.completion_tokens if completion_tokens is None else completion_tokens
    return {
        "prompt_tokens": counts.prompt_tokens,
        "total_tokens": counts.prompt_tokens + done,
        "completion_tokens": done,
    }


class ChatShape:
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def opening_chunks(self, ctx: ResponseContext, usage: UsageCounts | None) -> list[Body]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        chunk = _chunk(ctx, self.chunk_object, [choice])
        if usage is not None:
            chunk["usage"] = self._chunk_usage(usage, 0)
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return [chunk]

    def token_chunk(self, ctx: ResponseContext, text: str, finish_reason: str | None,
                    usage: UsageCounts | None) -> Body:
        choice: Body = {"index": 0, "delta": {"content": text}, "logprobs": None,
                        "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = None
        chunk = _chunk(ctx, self.chunk_object, [choice], finish_reason)
        if usage is not None:
            chunk["usage"] = self._chunk_usage(usage, usage.completion_tokens)
        return chunk

    def usage_chunk(self, ctx: ResponseContext, usage: UsageCounts) -> Body:
        body = _usage(usage)
        body["prompt_tokens_details"] = {
            "cached_tokens": usage.cached_tokens,
            "created_cache_tokens": usage.created_cache_tokens,
        }
        return _usage_chunk(ctx, self.chunk_object, body)

    def full_response(self, ctx: ResponseContext, text: str, finish_reason: str,
                      usage: UsageCounts) -> Body:
        message = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
        }
        body = _response(ctx, "chat.completion", choice,
                         _full_usage(usage, usage.created_cache_tokens))
        body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        return _with_trailer(body)

    @staticmethod
    def _chunk_usage(usage: UsageCounts, completion_tokens: int) -> Body:
        return {**_usage(usage, completion_tokens), "completion_tokens_details": None}


class CompletionShape:
    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    def opening_chunks(self, ctx: ResponseContext, usage: UsageCounts | None) -> list[Body]:
        return []

    def token_chunk(self, ctx: ResponseContext, text: str, finish_reason: str | None,
                    usage: UsageCounts | None) -> Body:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_token_ids": None,
            "token_ids": None,
        }
        chunk = _chunk(ctx, self.chunk_object, [choice], finish_reason)
        if usage is not None:
            chunk["usage"] = _usage(usage)
        return chunk

    def usage_chunk(self, ctx: ResponseContext, usage: UsageCounts) -> Body:
        body = _usage(usage)
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
        return _usage_chunk(ctx, self.chunk_object, body)

    def full_response(self, ctx: ResponseContext, text: str, finish_reason: str,
                      usage: UsageCounts) -> Body:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        # vLLM's completions endpoint does not report created_cache_tokens.
        return _with_trailer(_response(ctx, "text_completion", choice, _full_usage(usage, None)))


ResponseShape = ChatShape | CompletionShape


def _chunk(ctx: ResponseContext, object_type: str, choices: list[Body],
           finish_reason: str | None = None) -> Body:
    chunk: Body = {
        "id": ctx.response_id,
        "object": object_type,
        "created": ctx.created_s,
        "model": ctx.model,
        "choices": choices,
    }
    if finish_reason is not None and not ctx.include_usage:
        chunk["system_fingerprint"] = ctx.system_fingerprint
    return chunk


def _usage_chunk(ctx: ResponseContext, object_type: str, usage: Body) -> Body:
    chunk = _chunk(ctx, object_type, [])
    chunk["usage"] = usage
    chunk["system_fingerprint"] = ctx.system_fingerprint
    return chunk


def _full_usage(usage: UsageCounts, created_cache_tokens: int | None) -> Body:
    body = _usage(usage)
    body["prompt_tokens_details"] = {
        "cached_tokens": usage.cached_tokens,
        "created_cache_tokens": created_cache_tokens,
        "multimodal_tokens": None,
    }
    body["completion_tokens_details"] = None
    return body


def _response(ctx: ResponseContext, object_type: str, choice: Body, usage: Body) -> Body:
    return {
        "id": ctx.response_id,
        "object": object_type,
        "created": ctx.created_s,
        "model": ctx.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": ctx.system_fingerprint,
        "usage": usage,
    }


def _with_trailer(body: Body) -> Body:
    body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
    return body
