"""Requests the simulator accepts, decoded and checked as vLLM's OpenAI server does.

Fields the simulator does not model (temperature, stop, logprobs, tools, ...)
are accepted and ignored, as extra fields are by vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import msgspec

from loadtests.simulator.engine import MAX_MODEL_LEN_TOKENS, SamplingLimits
from loadtests.simulator.tokens import VOCAB_SIZE, encode, render_chat


class SimApiError(Exception):
    """A request vLLM would refuse; the app's middleware renders it as vLLM's error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, dict[str, str | int | None]]:
        # vLLM puts the HTTP status in `code`.
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }


class StreamOptions(msgspec.Struct):
    # vLLM's defaults: naming stream_options at all turns usage on.
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class _GenerationFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_GenerationFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_GenerationFields, kw_only=True):
    prompt: str | list[str | int]
    # vLLM's CompletionRequest default.
    max_tokens: int | None = 16


@dataclass(frozen=True)
class StreamMode:
    stream: bool
    include_usage: bool
    continuous_usage: bool


@dataclass(frozen=True)
class ParsedRequest:
    prompt_ids: list[int]
    limits: SamplingLimits
    mode: StreamMode


_RequestT = TypeVar("_RequestT", ChatCompletionRequest, CompletionRequest)
_CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)


def parse_chat(body: bytes, served_model: str) -> ParsedRequest:
    request = _decode(_CHAT_DECODER, body)
    _check_model(request.model, served_model)
    turns = [(message.role, _message_text(message)) for message in request.messages]
    prompt_ids = encode(render_chat(turns))
    requested = request.max_completion_tokens
    if requested is None:
        requested = request.max_tokens
    return _finish(request, prompt_ids, requested)


def parse_completion(body: bytes, served_model: str) -> ParsedRequest:
    request = _decode(_COMPLETION_DECODER, body)
    _check_model(request.model, served_model)
    return _finish(request, _prompt_ids(request.prompt), request.max_tokens)


def _decode(decoder: msgspec.json.Decoder[_RequestT], body: bytes) -> _RequestT:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SimApiError(f"Invalid request body: {exc}") from None


def _check_model(model: str | None, served_model: str) -> None:
    # vLLM serves its one model when the request names none.
    if model is not None and model != served_model:
        raise SimApiError(
            f"The model `{model}` does not exist.",
            status=404,
            err_type="NotFoundError",
            param="model",
        )


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    # vLLM's "string" content format joins text parts with newlines.
    return "\n".join(part.text or "" for part in message.content if part.type == "text")


def _prompt_ids(prompt: str | list[str | int]) -> list[int]:
    if isinstance(prompt, str):
        return encode(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return encode(prompt[0])
    if prompt and all(isinstance(item, int) for item in prompt):
        ids = [item for item in prompt if isinstance(item, int)]
        if any(not 0 <= item < VOCAB_SIZE for item in ids):
            raise SimApiError("Token id out of vocabulary", param="prompt")
        return ids
    raise SimApiError(
        "The simulator takes one prompt: a string or a list of token ids", param="prompt"
    )


def _finish(
    request: _GenerationFields, prompt_ids: list[int], requested_max: int | None
) -> ParsedRequest:
    if not prompt_ids:
        raise SimApiError("The decoder prompt cannot be empty", param="prompt")
    limits = _limits(request, len(prompt_ids), requested_max)
    if request.n != 1:
        raise SimApiError("The simulator supports only n=1", param="n")
    if request.stream_options is not None and not request.stream:
        raise SimApiError(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    options = request.stream_options or StreamOptions(include_usage=False)
    include_usage = bool(options.include_usage)
    mode = StreamMode(
        stream=request.stream,
        include_usage=include_usage,
        # vLLM sends per-chunk usage only when usage is on at all.
        continuous_usage=include_usage and bool(options.continuous_usage_stats),
    )
    return ParsedRequest(prompt_ids, limits, mode)


def _limits(
    request: _GenerationFields, prompt_tokens: int, requested_max: int | None
) -> SamplingLimits:
    if prompt_tokens >= MAX_MODEL_LEN_TOKENS:
        raise SimApiError(
            f"This model's maximum context length is {MAX_MODEL_LEN_TOKENS} tokens. However, "
            f"your request has {prompt_tokens} input tokens. Please reduce the length of the "
            "input messages.",
            param="input_tokens",
        )
    room_tokens = MAX_MODEL_LEN_TOKENS - prompt_tokens
    if requested_max is not None and requested_max > room_tokens:
        raise SimApiError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested_max}. This "
            f"model's maximum context length is {MAX_MODEL_LEN_TOKENS} tokens and your request "
            f"has {prompt_tokens} input tokens ({requested_max} > {MAX_MODEL_LEN_TOKENS} - "
            f"{prompt_tokens}).",
            param="max_tokens",
        )
    max_tokens = room_tokens if requested_max is None else requested_max
    if max_tokens < 1:
        raise SimApiError(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    if not 0 <= request.min_tokens <= max_tokens:
        raise SimApiError(
            f"min_tokens must be between 0 and max_tokens={max_tokens}, got {request.min_tokens}.",
            param="min_tokens",
        )
    return SamplingLimits(
        max_tokens=max_tokens, min_tokens=request.min_tokens, ignore_eos=request.ignore_eos
    )
