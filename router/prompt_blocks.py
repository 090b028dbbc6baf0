"""The prompt's vLLM prefix-cache block hashes, computed by the ingress so the
`prefix-precise` scorer can match them against the blocks replicas announce
in their KV events.

Per model (`models.<name>` in the config): its tokenizer and chat template
(router/prompt_tokens.py), block size, hash algorithm and seed. A chat prompt
is rendered and encoded as vLLM does, a completions prompt encoded as vLLM
does, token ids used as given; the tenant's `cache_salt` (which the ingress
sends upstream in place of any the client chose) goes into the first block's
extra keys, as in vLLM. A model without a tokenizer gets no block
hashes (the ingress sends chunk hashes, which the scorer then reads).

Tokenizing and hashing a 1k-token prompt costs about 1 ms here, 6k tokens
about 7 ms (loadtests/bench_prompt_hashing.py), so prompts above
`ingress.tokenize_inline_max_bytes` are tokenized on a small thread pool (HF
tokenizers releases the GIL while encoding). When every worker and queue slot
is taken, a request goes without block hashes rather than wait (counted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter

from router.prompt_tokens import ChatTemplateError, ModelTokenizer, chat_turn, load_tokenizer
from router.requests import ChatBody, CompletionBody, ParsedRequest
from scheduler.block_hash import DEFAULT_NONE_HASH_SEED, HASH_ALGOS, low64, prompt_block_hashes
from scheduler.config import ModelConfig
from scheduler.errors import ConfigError

log = logging.getLogger("switchyard.prompt_blocks")
# Tokenizations waiting for or running on each worker before requests are shed.
QUEUED_PER_THREAD = 4
# Keeps a placement request small; a prompt's leading blocks decide its placement.
MAX_PROMPT_BLOCKS = 4_096


def prompt_token_ids(tokenizer: ModelTokenizer, body: ChatBody | CompletionBody
                     ) -> list[int] | None:
    """The token ids vLLM builds for the request's prompt; None for a batch of
    prompts (no one placement serves them all)."""
    if isinstance(body, ChatBody):
        turns = [chat_turn(m.role, m.content if m.content is None or isinstance(m.content, str)
                           else [(part.type, part.text) for part in m.content], m.name)
                 for m in body.messages]
        return tokenizer.encode_chat(turns, add_generation_prompt=body.add_generation_prompt)
    prompt = body.prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return tokenizer.encode(prompt[0])
    if len(prompt) == 1 and isinstance(prompt[0], list):
        return prompt[0]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [item for item in prompt if isinstance(item, int)]
    return None


def request_block_hashes(tokenizer: ModelTokenizer, settings: ModelConfig,
                         body: ChatBody | CompletionBody,
                         cache_salt: str) -> tuple[int, ...] | None:
    """The low 64 bits of each full prompt block's digest, as KV events carry
    them; None when the prompt cannot be tokenized as one."""
    try:
        ids = prompt_token_ids(tokenizer, body)
    except ChatTemplateError:
        return None  # vLLM refuses it too; the replica's 400 reaches the client
    if ids is None:
        return None
    ids = ids[: MAX_PROMPT_BLOCKS * settings.block_size_tokens]
    digests = prompt_block_hashes(ids, settings.block_size_tokens,
                                  settings.prefix_caching_hash_algo,
                                  seed=settings.python_hash_seed or DEFAULT_NONE_HASH_SEED,
                                  cache_salt=cache_salt)
    return tuple(map(low64, digests))


def check_models(models: Mapping[str, ModelConfig]) -> None:
    for name, settings in models.items():
        if settings.block_size_tokens < 1:
            raise ConfigError(f"models.{name}.block_size_tokens must be at least 1")
        if settings.prefix_caching_hash_algo not in HASH_ALGOS:
            raise ConfigError(f"models.{name}.prefix_caching_hash_algo must be one of "
                              f"{', '.join(HASH_ALGOS)} (xxhash cannot be reproduced)")


class PromptHasher:
    """Block hashes of parsed requests, per model; owns the tokenizer threads."""

    def __init__(self, models: Mapping[str, ModelConfig], threads: int, inline_max_bytes: int,
                 outcomes: Counter) -> None:
        check_models(models)
        self._settings = {name: m for name, m in models.items() if m.tokenizer_dir}
        self._untokenized = sorted(models.keys() - self._settings.keys())
        self._tokenizers: dict[str, ModelTokenizer] = {}
        self._inline_max_bytes = inline_max_bytes
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                        thread_name_prefix="switchyard-tokenize")
        self._slots = asyncio.Semaphore(max(1, threads) * QUEUED_PER_THREAD)
        self._outcomes = outcomes

    async def start(self) -> None:
        """Loads every configured tokenizer (off the event loop: large ones take
        a while) and says which models fall back to approximate prefix scoring."""
        loop = asyncio.get_running_loop()
        try:
            for name, settings in self._settings.items():
                self._tokenizers[name] = await loop.run_in_executor(
                    self._pool, load_tokenizer, settings.tokenizer_dir)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            self.aclose()
            raise ConfigError(f"models.{name}.tokenizer_dir: cannot load a tokenizer from "
                              f"{settings.tokenizer_dir}: {exc}") from None
        for name in self._untokenized:
            log.warning("model %s has no tokenizer_dir: prefix-precise scores it by the "
                        "approximate index", name)
        log.info("precise prefix routing: block hashes for %s; any other model is scored "
                 "by the approximate index", ", ".join(sorted(self._tokenizers)) or "no model")

    def aclose(self) -> None:
        # Running encodes finish on their own; nothing waits for their results.
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def block_hashes(self, parsed: ParsedRequest) -> tuple[int, ...] | None:
        """None when the model has no tokenizer, the prompt is a batch, or the
        pool is saturated: the caller sends chunk hashes instead."""
        tokenizer = self._tokenizers.get(parsed.model)
        if tokenizer is None:
            self._outcomes.labels("no_tokenizer").inc()
            return None
        settings = self._settings[parsed.model]
        if len(parsed.prompt_bytes) <= self._inline_max_bytes:
            hashes = request_block_hashes(tokenizer, settings, parsed.body, parsed.cache_salt)
            outcome = "inline"
        elif self._slots.locked():
            hashes, outcome = None, "shed"
        else:
            async with self._slots:
                hashes = await asyncio.get_running_loop().run_in_executor(
                    self._pool, request_block_hashes, tokenizer, settings, parsed.body,
                    parsed.cache_salt)
            outcome = "pooled"
        self._outcomes.labels(outcome if hashes is not None or outcome == "shed"
                              else "untokenizable").inc()
        return hashes
