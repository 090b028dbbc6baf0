"""The simulator's stand-in tokenizer and chat template.

Tokens are words or single punctuation marks carrying the whitespace before
them (like byte-level BPE's leading-space tokens); a trailing whitespace run
is a token of its own, and the two ChatML markers are single special tokens.
A token's id is a hash of its text, so ids agree across processes and
replicas without a vocabulary file. Rendering is prefix-stable: a
conversation that extends another renders to a string that extends it, and
because special tokens split the text first, to a token list that extends it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import lru_cache

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Prompt token ids sent as a list must fall in this range (ids are 31-bit hashes).
VOCAB_SIZE = 1 << 31

_SPECIAL_SPLIT = re.compile(f"({re.escape(IM_START)}|{re.escape(IM_END)})")
_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


@lru_cache(maxsize=65_536)
def token_id(piece: str) -> int:
    """The id of one token's text; blake2b because hash() differs per process."""
    digest = hashlib.blake2b(piece.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % VOCAB_SIZE


def split_pieces(text: str) -> list[str]:
    """The token texts of `text`, in order; joined they give `text` back."""
    pieces: list[str] = []
    for segment in _SPECIAL_SPLIT.split(text):
        if segment in (IM_START, IM_END):
            pieces.append(segment)
        elif segment:
            pieces.extend(_PIECE.findall(segment))
    return pieces


def encode(text: str) -> list[int]:
    return [token_id(piece) for piece in split_pieces(text)]


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """ChatML over (role, text) pairs, ending with the assistant's generation prompt."""
    turns = [f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in messages]
    return "".join(turns) + f"{IM_START}assistant\n"
