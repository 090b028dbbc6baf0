"""Validation of the usage a replica reports, before it is billed.

A replica's counts are trusted only within what the request could have
cost: cached <= prompt <= the prompt's size bound, completion <= max_tokens.
Anything outside (negative, absurd, missing) is clamped into that range and
named, so the ingress can count it (`switchyard_usage_anomalies_total`)."""

from __future__ import annotations

import msgspec

# A byte-level tokenizer never makes more tokens than the prompt has bytes;
# the chat template adds a few per message (role markers) and, at the start,
# maybe a default system prompt.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS = 64
# The bound on completion tokens when the client set no max_tokens (the
# replica's context is the real one, unknown here): beyond any model's context.
ABSURD_COMPLETION_TOKENS = 1 << 24

# Anomaly kinds (the metric's `kind` label).
MISSING = "missing"
NEGATIVE = "negative"
PROMPT_OVER_BOUND = "prompt_over_bound"
CACHED_OVER_PROMPT = "cached_over_prompt"
COMPLETION_OVER_MAX = "completion_over_max"


class Reported(msgspec.Struct, frozen=True):
    """Usage as the replica reported it (any integers, maybe negative)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class Billed(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def prompt_tokens_bound(prompt_bytes: int, messages: int) -> int:
    """The most tokens a prompt of `prompt_bytes` bytes in `messages` chat
    messages (1 for a completions prompt) can have."""
    return prompt_bytes + TEMPLATE_TOKENS_PER_MESSAGE * messages + TEMPLATE_TOKENS


def clamp_usage(reported: Reported | None, *, prompt_bound_tokens: int, prompt_est_tokens: int,
                max_tokens: int, seen_completion_tokens: int) -> tuple[Billed, tuple[str, ...]]:
    """The usage to bill and the anomalies found. `reported` None: the
    replica accepted the request but sent no usage, so the prompt is billed
    at the ingress's estimate and the completion at the tokens it relayed.
    `max_tokens` 0: the client set none."""
    completion_max = max_tokens if max_tokens > 0 else ABSURD_COMPLETION_TOKENS
    if reported is None:
        completion = min(seen_completion_tokens, completion_max)
        return Billed(min(prompt_est_tokens, prompt_bound_tokens), completion, 0), (MISSING,)
    anomalies: list[str] = []
    prompt, completion, cached = (reported.prompt_tokens, reported.completion_tokens,
                                  reported.cached_tokens)
    if min(prompt, completion, cached) < 0:
        anomalies.append(NEGATIVE)
        prompt, completion, cached = max(prompt, 0), max(completion, 0), max(cached, 0)
    if prompt > prompt_bound_tokens:
        anomalies.append(PROMPT_OVER_BOUND)
        prompt = prompt_bound_tokens
    if cached > prompt:
        anomalies.append(CACHED_OVER_PROMPT)
        cached = prompt
    if completion > completion_max:
        anomalies.append(COMPLETION_OVER_MAX)
        completion = completion_max
    return Billed(prompt, completion, cached), tuple(anomalies)
