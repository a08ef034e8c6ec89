"""A model's own chat template, so a chat request's tokens are the ones the engine caches.

The router's default chat blocks hash one segment per message (`prompt.py`): equal
conversations give equal blocks, which is all the modelled cache needs. KV events name the
engine's real pages, whose tokens are the chat template's rendering: SGLang (0.5.23, with the
model's HF template) calls `tokenizer.apply_chat_template(messages, add_generation_prompt=
True)`, i.e. renders the template's Jinja and encodes the text without adding special tokens.
`ChatTemplate.render` does the same with the same Jinja settings as `transformers`
(sandboxed, `trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`), so with
`--tokenizer` pointing at the model folder the router's chat blocks are the engine's pages.

`load_chat_template(path)` reads `chat_template` from the `tokenizer_config.json` beside a
tokenizer.json (or a `chat_template.jinja` there); None when the model has none. jinja2 is
part of the `hf` extra, imported only then.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template"]


class ChatTemplateError(ValueError):
    """The template could not render these messages (the caller falls back to segments)."""


class ChatTemplate:
    """A compiled HF chat template with the tokenizer's special tokens."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None):
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise RuntimeError(
                "chat templates need jinja2: pip install 'prefix-router[hf]'"
            ) from exc

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(value: Any, indent: int | None = None) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._errors: tuple[type[Exception], ...] = (TemplateError, TypeError, ValueError)
        self.special_tokens = dict(special_tokens or {})

    def render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
    ) -> str:
        """The prompt text SGLang builds for these messages (generation prompt added)."""
        try:
            text: str = self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except self._errors as exc:
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}") from None
        return text


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])  # an AddedToken written out as a dict
    return None


def load_chat_template(path: str) -> ChatTemplate | None:
    """The chat template beside a tokenizer.json (or in a model folder); None if it has none."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config: dict[str, Any] = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, dict):
            config = loaded
    source = config.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if not isinstance(source, str) and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            source = f.read()
    if not isinstance(source, str) or not source:
        return None  # none, or a list of named templates: not guessed
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return ChatTemplate(source, {n: _token_text(config.get(n)) for n in names})
