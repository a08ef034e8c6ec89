"""Request bodies -> canonical prompts: the text (or token ids) whose prefix a backend caches.

Three request shapes reach the router, and each becomes one `Prompt`:

- OpenAI `/v1/chat/completions`: one segment per message, ``"role\\ncontent"`` in order, with a
  leading ``"tools\\n<json>"`` segment when tools are declared (chat templates render them into
  the system prompt, so they are part of the cached prefix). Content may be a string or a list
  of parts; text parts are joined, an image/audio/video/file part becomes a short placeholder
  naming a digest of its payload (never the payload itself: data URLs are megabytes).
- OpenAI `/v1/completions`: ``prompt`` as a string, a list of strings (a batch, routed as one
  request), a list of token ids, or a list of such lists.
- SGLang `/generate`: ``text`` (string or batch of strings) or ``input_ids`` (used directly,
  no tokenizer), ``sampling_params.max_new_tokens``.

Segments are the unit of tokenization caching (`tokens.SegmentTokenCache`): a conversation's
turn N+1 repeats turn N's segments verbatim, so only the new messages are tokenized.
A text prompt (completions, /generate) has no messages, so each string is cut by position into
chunks of at most `TEXT_CHUNK_CHARS` characters, each cut just before the last whitespace of
its window (a hard cut where a window has none). A cut depends only on the text from the
chunk's start to the window's end, so a prompt that extends an earlier one repeats all of its
chunks but the last, and only the tail is tokenized again::

    earlier | c0 | c1 | c2 | c3' |
    later   | c0 | c1 | c2 | c3       | c4 | c5' |     c0..c2 cached; c3 on are new

Token ids are per chunk, so a text prompt's block hashes differ from those of its unchunked
tokenization (a chunk boundary may fall inside what one encoding pass would make one token);
what routing needs, equal hashes for equal text prefixes across requests, holds. Chat
segments are never chunked (their hashes do not depend on this).
``salt`` (model name, LoRA adapter, ``cache_salt``) seeds the block-hash chain, so the same text
sent to two models never looks shared.

Validation is strict and every failure is a `PromptError` whose message names the offending
field (``messages[2].content[0].text must be a string``) but never echoes client text, so the
proxy can return it verbatim in a 400.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "TEXT_CHUNK_CHARS",
    "Prompt",
    "PromptError",
    "parse_chat",
    "parse_completion",
    "parse_generate",
]

# ~400-500 tokens of English: small enough that a growing prompt re-tokenizes little, large
# enough that a 100k-token prompt is a few hundred segments (cheap to look up).
TEXT_CHUNK_CHARS = 2000

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_MEDIA_PARTS = {
    "image_url": "image_url",
    "input_audio": "input_audio",
    "video_url": "video_url",
    "audio_url": "audio_url",
    "file": "file",
}


class PromptError(ValueError):
    """A request body the router cannot route; the message is safe to show the client."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
    """A request's cacheable prefix in canonical form, plus what routing needs besides it."""

    kind: Literal["chat", "completion", "generate"]
    segments: tuple[str, ...] = ()
    input_ids: tuple[int, ...] | None = None
    salt: str = ""
    max_tokens: int | None = None
    session_key: str | None = None
    # a chat request's (messages, tools) as sent, for a model's own chat template (blocks.py)
    chat: tuple[Sequence[Any], Sequence[Any] | None] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.input_ids is None and not self.segments:
            raise PromptError("prompt is empty")
        if self.input_ids is not None and self.segments:
            raise PromptError("a prompt has either text segments or input_ids, not both")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise PromptError("max_tokens must be non-negative")


def parse_chat(body: Mapping[str, Any]) -> Prompt:
    """An OpenAI chat-completions body -> one segment per message (plus declared tools)."""
    _require_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    segments: list[str] = []
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise PromptError("tools must be a list")
        if tools:
            segments.append("tools\n" + _canonical_json(tools, "tools"))
    append = segments.append
    for i, message in enumerate(messages):
        # Fast path for the common {"role", "content": str} message; same segment as below.
        if type(message) is dict and len(message) == 2:
            role = message.get("role")
            content = message.get("content")
            if type(role) is str and type(content) is str and role in _ROLES:
                append(f"{role}\n{content}")
                continue
        append(_message_segment(message, f"messages[{i}]"))
    max_tokens = _optional_count(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _optional_count(body, "max_tokens")
    return Prompt(
        kind="chat",
        segments=tuple(segments),
        salt=_salt(body, _optional_str(body, "model")),
        max_tokens=max_tokens,
        session_key=_session_key(body),
        chat=(messages, tools or None),
    )


def parse_completion(body: Mapping[str, Any]) -> Prompt:
    """An OpenAI completions body -> segments (text prompts) or input_ids (token prompts)."""
    _require_object(body)
    if "prompt" not in body:
        raise PromptError("prompt is required")
    segments, input_ids = _text_or_ids(body["prompt"], "prompt")
    return Prompt(
        kind="completion",
        segments=segments,
        input_ids=input_ids,
        salt=_salt(body, _optional_str(body, "model")),
        max_tokens=_optional_count(body, "max_tokens"),
        session_key=_session_key(body),
    )


def parse_generate(body: Mapping[str, Any]) -> Prompt:
    """An SGLang /generate body -> segments (``text``) or input_ids (``input_ids``)."""
    _require_object(body)
    has_text = body.get("text") is not None
    has_ids = body.get("input_ids") is not None
    if has_text == has_ids:
        raise PromptError("exactly one of text or input_ids is required")
    if has_text:
        segments, input_ids = _text_or_ids(body["text"], "text", allow_ids=False)
    else:
        segments, input_ids = _text_or_ids(body["input_ids"], "input_ids", allow_text=False)
    max_tokens: int | None = None
    params = body.get("sampling_params")
    if params is not None:
        if isinstance(params, list):  # a batch may carry one set per prompt; the first decides
            params = params[0] if params else None
        if params is not None:
            if not isinstance(params, Mapping):
                raise PromptError("sampling_params must be an object")
            max_tokens = _optional_count(params, "max_new_tokens", "sampling_params.")
    return Prompt(
        kind="generate",
        segments=segments,
        input_ids=input_ids,
        salt=_salt(body, None),
        max_tokens=max_tokens,
        session_key=_session_key(body),
    )


def _require_object(body: object) -> None:
    if not isinstance(body, Mapping):
        raise PromptError("request body must be a JSON object")


def _message_segment(message: object, where: str) -> str:
    if not isinstance(message, Mapping):
        raise PromptError(f"{where} must be an object")
    role = message.get("role")
    if not isinstance(role, str):
        raise PromptError(f"{where}.role must be a string")
    if role not in _ROLES:
        raise PromptError(f"{where}.role must be one of {', '.join(sorted(_ROLES))}")
    head = role
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise PromptError(f"{where}.name must be a string")
        head = f"{role}:{name}"
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if content is None:
        if role != "assistant" or tool_calls is None:
            raise PromptError(f"{where}.content is required")
        text = ""
    else:
        text = _content_text(content, f"{where}.content")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise PromptError(f"{where}.tool_calls must be a list")
        text += "\n" + _canonical_json(tool_calls, f"{where}.tool_calls")
    tool_call_id = message.get("tool_call_id")
    if tool_call_id is not None:
        if not isinstance(tool_call_id, str):
            raise PromptError(f"{where}.tool_call_id must be a string")
        head += f"#{tool_call_id}"
    return f"{head}\n{text}"


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PromptError(f"{where} must be a string or a list of parts")
    pieces: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise PromptError(f"{at} must be an object")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise PromptError(f"{at}.type must be a string")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"{at}.text must be a string")
            pieces.append(text)
        elif kind in _MEDIA_PARTS:
            payload = part.get(_MEDIA_PARTS[kind])
            if payload is None:
                raise PromptError(f"{at}.{_MEDIA_PARTS[kind]} is required")
            digest = hashlib.blake2b(
                _canonical_json(payload, f"{at}.{kind}").encode(), digest_size=12
            ).hexdigest()
            pieces.append(f"<{kind}:{digest}>")
        else:
            raise PromptError(f"{at}.type is not a supported content part type")
    return "".join(pieces)


def _text_or_ids(
    value: object, where: str, *, allow_text: bool = True, allow_ids: bool = True
) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """str | list[str] -> segments; list[int] | list[list[int]] -> input_ids (concatenated)."""
    what = " or ".join(
        w
        for w, ok in (
            ("a string or a list of strings", allow_text),
            ("a list of token ids", allow_ids),
        )
        if ok
    )
    if isinstance(value, str):
        if not allow_text:
            raise PromptError(f"{where} must be {what}")
        if not value:
            raise PromptError(f"{where} must not be empty")
        return _chunks(value), None
    if not isinstance(value, list) or not value:
        raise PromptError(f"{where} must be a non-empty list or {what}")
    first = value[0]
    if isinstance(first, str):
        if not allow_text or not all(isinstance(v, str) for v in value):
            raise PromptError(f"{where} must be {what}")
        if len(value) == 1:
            return _chunks(value[0]), None
        return tuple(c for text in value for c in _chunks(text)), None
    if not allow_ids:
        raise PromptError(f"{where} must be {what}")
    if isinstance(first, list):
        ids: list[int] = []
        for k, row in enumerate(value):
            if not isinstance(row, list) or not row:
                raise PromptError(f"{where}[{k}] must be a non-empty list of token ids")
            ids.extend(_token_ids(row, f"{where}[{k}]"))
        return (), tuple(ids)
    return (), _token_ids(value, where)


def _chunks(text: str, size: int = TEXT_CHUNK_CHARS) -> tuple[str, ...]:
    """Position-based chunks, each cut before its window's last space or newline."""
    n = len(text)
    if n <= size:
        return (text,)
    out: list[str] = []
    start = 0
    while n - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1))
        if cut <= start:
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return tuple(out)


def _token_ids(values: Sequence[object], where: str) -> tuple[int, ...]:
    for v in values:
        if type(v) is not int or v < 0:  # bool is an int subclass: reject it too
            raise PromptError(f"{where} must contain only non-negative integer token ids")
    return tuple(values)  # type: ignore[arg-type]  # checked element by element above


def _optional_str(body: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PromptError(f"{prefix}{key} must be a string")
    return value


def _optional_count(body: Mapping[str, Any], key: str, prefix: str = "") -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise PromptError(f"{prefix}{key} must be an integer")
    if value < 0:
        raise PromptError(f"{prefix}{key} must be non-negative")
    return value


def _salt(body: Mapping[str, Any], model: str | None) -> str:
    """What separates caches that share text: model, LoRA adapter, explicit cache salt."""
    parts = [model or ""]
    for key in ("lora_path", "cache_salt"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, list):  # /generate batches give one adapter per prompt
            value = value[0] if value else None
            if value is None:
                continue
        if not isinstance(value, str):
            raise PromptError(f"{key} must be a string")
        parts.append(f"{key}={value}")
    return "\x1f".join(parts) if len(parts) > 1 else parts[0]


def _session_key(body: Mapping[str, Any]) -> str | None:
    for key in ("session_id", "user"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise PromptError(f"{key} must be a string")
        if value:
            return value
    return None


def _canonical_json(value: object, where: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        raise PromptError(f"{where} must be plain JSON") from None
