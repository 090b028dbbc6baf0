"""A model's tokenizer and chat template, applied as vLLM applies them.

vLLM tokenizes with the model directory's tokenizer.json and renders chat
with the `chat_template` of its tokenizer_config.json, the way transformers'
apply_chat_template does: a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, the special tokens as variables, then encoding without added
special tokens. Doing the same gives the prompt token ids vLLM hashes into
prefix-cache blocks. The ingress uses it for precise prefix routing and the
replica simulator (loadtests/simulator) for its prompts: one implementation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplateError(ValueError):
    """The template rejected the conversation (vLLM answers 400)."""


class ModelTokenizer:
    """Tokenizer, chat template and EOS of one model directory."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        self.special_tokens = {key: _token_text(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.eos_token_id = _eos_token_id(model_dir, self.tokenizer, self.special_tokens)
        # Ids the model never samples in the simulator besides EOS (pad, bos, im_start, ...).
        self.special_ids = frozenset(self.tokenizer.get_added_tokens_decoder())
        self._template = _jinja_env().from_string(config["chat_template"])

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """vLLM's default for a completions prompt adds special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The prompt token ids vLLM builds for a chat request."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        # The template writes the special tokens itself unless asked for more.
        return self.encode(text, add_special_tokens=add_special_tokens)


def chat_turn(role: str, content: str | Sequence[tuple[str, str | None]] | None,
              name: str | None = None) -> dict[str, str]:
    """One message as vLLM hands it to the template; `content` is a string or
    (part type, text) pairs, of which vLLM's "string" content format joins the
    text parts with newlines."""
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        text = "\n".join(part_text or "" for part_type, part_text in content
                         if part_type == "text")
    turn = {"role": role, "content": text}
    if name is not None:
        turn["name"] = name
    return turn


@lru_cache(maxsize=16)
def load_tokenizer(model_dir: str) -> ModelTokenizer:
    """The tokenizer of `model_dir`, loaded once per process."""
    return ModelTokenizer(Path(model_dir))


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


def _tojson(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: object) -> str | None:
    # tokenizer_config may give a special token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return str(value.get("content"))
    return None if value is None else str(value)


def _eos_token_id(model_dir: Path, tokenizer: Tokenizer, special: dict[str, str | None]) -> int:
    # vLLM stops on generation_config's eos_token_id when the model has one.
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            return eos
    eos_text = special["eos_token"]
    eos_id = tokenizer.token_to_id(eos_text) if eos_text else None
    if eos_id is None:
        raise ValueError(f"{model_dir} names no EOS token")
    return eos_id
