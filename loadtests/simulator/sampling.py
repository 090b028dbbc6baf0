"""What a simulated request generates: token ids drawn from the model's vocabulary,
deterministic in the config seed and the prompt, and when it stops.

Like the tiny model with random weights, it samples any ordinary token and
EOS now and then; the text is whatever those ids detokenize to (often
incomplete UTF-8, hence empty deltas, as with real vLLM). The same prompt
gets the same tokens on every replica, so a retry elsewhere is
indistinguishable from the first try. Pure.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass

# Chance that a token is EOS once min_tokens are out; mean natural length 50.
EOS_PROBABILITY = 0.02


@dataclass(frozen=True, kw_only=True)
class SamplingLimits:
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class Vocabulary:
    """The ids a simulated model samples: every ordinary token, and EOS."""

    ordinary_ids: tuple[int, ...]
    eos_token_id: int

    @classmethod
    def of(cls, vocab_size: int, eos_token_id: int, special_ids: Collection[int]) -> Vocabulary:
        ordinary = tuple(i for i in range(vocab_size) if i not in special_ids)
        return cls(ordinary, eos_token_id)


def request_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(
        struct.pack(f"<q{len(prompt_ids)}I", seed, *prompt_ids), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


class TokenSampler:
    """The output token ids of one request, one per call."""

    def __init__(self, seed: int, prompt_ids: Sequence[int], vocab: Vocabulary) -> None:
        self._rng = random.Random(request_seed(seed, prompt_ids))
        self._vocab = vocab

    def next_token(self, index: int, limits: SamplingLimits) -> int:
        """The token at output position `index`."""
        # Both draws happen every step so the tokens do not depend on the limits.
        eos_draw = self._rng.random()
        ordinary = self._vocab.ordinary_ids
        token_id = ordinary[self._rng.randrange(len(ordinary))]
        # vLLM masks EOS until min_tokens are out; ignore_eos lets it through without stopping.
        if index >= limits.min_tokens and eos_draw < EOS_PROBABILITY:
            return self._vocab.eos_token_id
        return token_id

    def finish_reason(self, num_output_tokens: int, num_tokens: int, last_token_id: int,
                      limits: SamplingLimits, max_model_len: int) -> str | None:
        """Why generation ends after this token, or None; vLLM checks the length cap first."""
        if num_output_tokens >= limits.max_tokens or num_tokens >= max_model_len:
            return "length"
        if last_token_id == self._vocab.eos_token_id and not limits.ignore_eos:
            return "stop"
        return None
