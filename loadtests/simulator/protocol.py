"""Requests the simulator accepts, decoded and checked as vLLM's OpenAI server does.

Prompts are tokenized with the served model's tokenizer and chat template,
so prompt token ids equal real vLLM's. Fields the simulator does not model
(temperature, stop, logprobs, tools, ...) are accepted and ignored, as extra
fields are by vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from loadtests.simulator.sampling import SamplingLimits
from router.prompt_tokens import ChatTemplateError, ModelTokenizer, chat_turn


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
    name: str | None = None


class _GenerationFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None


class ChatCompletionRequest(_GenerationFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True


class CompletionRequest(_GenerationFields, kw_only=True):
    prompt: str | list[str | int]
    # vLLM's CompletionRequest default.
    max_tokens: int | None = 16


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's TokenizeCompletionRequest or TokenizeChatRequest, told apart by their fields."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    # None: vLLM's default, True for a prompt and False for messages.
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


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
    cache_salt: str | None = None


_RequestT = TypeVar("_RequestT", ChatCompletionRequest, CompletionRequest, TokenizeRequest)
_CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
_TOKENIZE_DECODER = msgspec.json.Decoder(TokenizeRequest)


class RequestParser:
    """Parses requests for one served model: its name, tokenizer and context length."""

    def __init__(self, model: str, tokenizer: ModelTokenizer, max_model_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def chat(self, body: bytes) -> ParsedRequest:
        request = _decode(_CHAT_DECODER, body)
        self._check_model(request.model)
        prompt_ids = self._chat_ids(request.messages, request.add_generation_prompt)
        if request.max_completion_tokens is not None:
            return self._finish(request, prompt_ids, request.max_completion_tokens,
                                "max_completion_tokens")
        return self._finish(request, prompt_ids, request.max_tokens, "max_tokens")

    def completion(self, body: bytes) -> ParsedRequest:
        request = _decode(_COMPLETION_DECODER, body)
        self._check_model(request.model)
        return self._finish(request, self._prompt_ids(request.prompt), request.max_tokens,
                            "max_tokens")

    def tokenize(self, body: bytes) -> dict[str, Any]:
        """vLLM's /tokenize: the ids the engine would see for a prompt or a conversation."""
        request = _decode(_TOKENIZE_DECODER, body)
        self._check_model(request.model)
        if request.messages is not None:
            ids = self._chat_ids(request.messages, request.add_generation_prompt,
                                 add_special_tokens=bool(request.add_special_tokens))
        elif request.prompt is not None:
            add_special = request.add_special_tokens is not False
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=add_special)
        else:
            raise SimApiError("Either `prompt` or `messages` is required", param="prompt")
        strs = ([self.tokenizer.tokenizer.id_to_token(i) for i in ids]
                if request.return_token_strs else None)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": strs}

    def _chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool, *,
                  add_special_tokens: bool = False) -> list[int]:
        conversation = [_message_dict(message) for message in messages]
        try:
            return self.tokenizer.encode_chat(conversation,
                                              add_generation_prompt=add_generation_prompt,
                                              add_special_tokens=add_special_tokens)
        except ChatTemplateError as exc:
            raise SimApiError(str(exc), param="messages") from None

    def _check_model(self, model: str | None) -> None:
        # vLLM serves its one model when the request names none.
        if model is not None and model != self.model:
            raise SimApiError(
                f"The model `{model}` does not exist. Valid aliases: {self.model}.",
                status=404,
                err_type="NotFoundError",
                param="model",
            )

    def _prompt_ids(self, prompt: str | list[str | int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return self.tokenizer.encode(prompt[0])
        if prompt and all(isinstance(item, int) for item in prompt):
            ids = [item for item in prompt if isinstance(item, int)]
            for bad in (min(ids), max(ids)):
                if not 0 <= bad < self.tokenizer.vocab_size:
                    raise SimApiError(f"Token id {bad} is out of vocabulary", param="prompt")
            return ids
        raise SimApiError(
            "The simulator takes one prompt: a string or a list of token ids", param="prompt"
        )

    def _finish(self, request: _GenerationFields, prompt_ids: list[int],
                requested_max: int | None, max_param: str) -> ParsedRequest:
        if not prompt_ids:
            raise SimApiError("The decoder prompt cannot be empty", param="prompt")
        limits = self._limits(request, len(prompt_ids), requested_max, max_param)
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
        return ParsedRequest(prompt_ids, limits, mode, request.cache_salt)

    def _limits(self, request: _GenerationFields, prompt_tokens: int, requested_max: int | None,
                max_param: str) -> SamplingLimits:
        """vLLM 0.32's checks: a max above the context is an error, a max that only
        does not fit beside the prompt is cut down to what fits."""
        max_len = self.max_model_len
        if requested_max is not None and requested_max > max_len:
            raise SimApiError(
                f"{max_param}={requested_max} cannot be greater than max_model_len={max_len}. "
                f"Please request fewer output tokens. (parameter={max_param}, "
                f"value={requested_max})",
                param=max_param,
            )
        if prompt_tokens > max_len:
            raise SimApiError(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"prompt contains {prompt_tokens} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={prompt_tokens})",
                param="input_tokens",
            )
        room_tokens = max_len - prompt_tokens
        max_tokens = room_tokens if requested_max is None else min(requested_max, room_tokens)
        if max_tokens < 1:
            raise SimApiError(
                f"max_tokens must be at least 1, got {max_tokens}. (parameter=max_tokens, "
                f"value={max_tokens})",
                param="max_tokens",
            )
        if request.min_tokens < 0:
            raise SimApiError(
                f"min_tokens must be greater than or equal to 0, got {request.min_tokens}.")
        if request.min_tokens > max_tokens:
            raise SimApiError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                              f"got {request.min_tokens}.")
        return SamplingLimits(
            max_tokens=max_tokens, min_tokens=request.min_tokens, ignore_eos=request.ignore_eos
        )


def _decode(decoder: msgspec.json.Decoder[_RequestT], body: bytes) -> _RequestT:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SimApiError(f"Invalid request body: {exc}") from None


def _message_dict(message: ChatMessage) -> dict[str, str]:
    parts = (message.content if message.content is None or isinstance(message.content, str)
             else [(part.type, part.text) for part in message.content])
    return chat_turn(message.role, parts, message.name)
