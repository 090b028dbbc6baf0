"""Generated token ids back to text, as vLLM's fast incremental detokenizer does."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# tokenizers raises this when a byte-level stream decodes to a non-monotonic
# prefix; vLLM restarts the stream on it, and so do we.
_INVALID_PREFIX_ERROR = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """Text deltas of generated tokens, as vLLM's fast incremental detokenizer
    yields them: a token completing no UTF-8 character yields "" and its bytes
    come out with a later token; special tokens yield ""."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        # Primed with the prompt so a leading space or a split character decodes as in vLLM.
        self._stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception as exc:  # tokenizers raises a bare Exception for this case
            if not str(exc).startswith(_INVALID_PREFIX_ERROR):
                raise
            self._stream = DecodeStream(skip_special_tokens=True)
            text = self._stream.step(self._tokenizer, token_id)
        return text or ""
