"""SGLang's HTTP request and response shapes, as pure functions for the simulated server.

Parsing turns a JSON body of `/generate`, `/v1/completions` or `/v1/chat/completions` into one
`GenRequest` (prompt token ids, output length, streaming options) or raises `BadRequest` with
a message like SGLang's. Rendering turns a request's progress (`Progress`: tokens produced so
far, cached tokens, finish state) into the JSON SGLang would send: `/generate` bodies and
stream chunks carry the CUMULATIVE text and a `meta_info`; OpenAI bodies carry `usage` with
`prompt_tokens_details.cached_tokens`, and OpenAI stream chunks carry deltas.

Shapes follow SGLang's `entrypoints/http_server.py` and `entrypoints/openai/protocol.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from backends.sim.textgen import ChatTemplateError, apply_chat_template, filler_ids, filler_text

__all__ = [
    "BadRequest",
    "GenRequest",
    "Kind",
    "Progress",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "generate_response",
    "openai_error",
    "parse_chat",
    "parse_completion",
    "parse_generate",
    "usage_chunk",
]

Kind = Literal["generate", "completion", "chat"]
FinishState = Literal["running", "length", "abort"]


class BadRequest(ValueError):
    """The body is not a request SGLang would accept (HTTP 400)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenRequest:
    """One generation request, whatever endpoint it came through."""

    kind: Kind
    rid: str
    input_ids: tuple[int, ...] | None  # given directly (`/generate` input_ids, token prompts)
    text: str | None  # to be tokenized by the server
    max_new_tokens: int | None  # None: the server's default
    stream: bool
    include_usage: bool = False  # OpenAI stream_options.include_usage
    model: str | None = None  # as the client named it (echoed back)
    # SGLang's `priority` (all three endpoints take it); read only with priority scheduling
    priority: int | None = None

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.text is None):
            raise ValueError("exactly one of input_ids and text")


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """Where a request stands: what a response or stream chunk reports."""

    rid: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    state: FinishState
    e2e_latency: float  # seconds since arrival (wall clock)
    text_offset: int  # where in the filler cycle this request's output starts
    created: int  # unix seconds, for OpenAI objects


def _obj(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise BadRequest("request body must be a JSON object")
    return body


def _opt_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be a boolean")
    return value


def _opt_positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer")
    if value < 0:
        raise BadRequest(f"'{name}' must be non-negative")
    return value


def _priority(body: Mapping[str, Any]) -> int | None:
    value = body.get("priority")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest("'priority' must be an integer")
    return value


def _rid(body: Mapping[str, Any], prefix: str) -> str:
    rid = body.get("rid")
    if rid is None:
        return prefix + uuid.uuid4().hex
    if not isinstance(rid, str) or not rid:
        raise BadRequest("'rid' must be a non-empty string (batches are not supported)")
    return rid


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"'{name}' must be a non-empty list of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            if isinstance(t, list):
                raise BadRequest(f"batched '{name}' is not supported")
            raise BadRequest(f"'{name}' must hold non-negative integers")
    return tuple(value)


def _stream_options(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, Mapping):
        raise BadRequest("'stream_options' must be an object")
    return _opt_bool(opts, "include_usage")


def _model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    return model


def _single_choice(body: Mapping[str, Any]) -> None:
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise BadRequest("only n=1 is supported")


def parse_generate(raw: Any) -> GenRequest:
    """`/generate`: `text` or `input_ids`, `sampling_params.max_new_tokens`, `stream`, `rid`."""
    body = _obj(raw)
    text = body.get("text")
    ids = body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("Either text or input_ids should be provided.")
    if text is not None and not isinstance(text, str):
        if isinstance(text, list):
            raise BadRequest("batched 'text' is not supported")
        raise BadRequest("'text' must be a string")
    params = body.get("sampling_params") or {}
    if not isinstance(params, Mapping):
        raise BadRequest("'sampling_params' must be an object")
    return GenRequest(
        kind="generate",
        rid=_rid(body, ""),
        input_ids=None if ids is None else _token_ids(ids, "input_ids"),
        text=text,
        max_new_tokens=_opt_positive_int(
            params.get("max_new_tokens"), "sampling_params.max_new_tokens"
        ),
        stream=_opt_bool(body, "stream"),
        priority=_priority(body),
    )


def parse_completion(raw: Any) -> GenRequest:
    """`/v1/completions`: `prompt` as a string, token ids, or a one-element list of either."""
    body = _obj(raw)
    _single_choice(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' must not be empty")
        text = prompt
    elif isinstance(prompt, list):
        ids = _token_ids(prompt, "prompt")
    elif prompt is None:
        raise BadRequest("'prompt' is required")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids")
    return GenRequest(
        kind="completion",
        rid=_rid(body, "cmpl-"),
        input_ids=ids,
        text=text,
        max_new_tokens=_opt_positive_int(body.get("max_tokens"), "max_tokens"),
        stream=_opt_bool(body, "stream"),
        include_usage=_stream_options(body),
        model=_model(body),
        priority=_priority(body),
    )


def parse_chat(raw: Any) -> GenRequest:
    """`/v1/chat/completions`: `messages` rendered with the simple chat template."""
    body = _obj(raw)
    _single_choice(body)
    if "messages" not in body:
        raise BadRequest("'messages' is required")
    try:
        text = apply_chat_template(body["messages"])
    except ChatTemplateError as exc:
        raise BadRequest(str(exc)) from None
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    return GenRequest(
        kind="chat",
        rid=_rid(body, "chatcmpl-"),
        input_ids=None,
        text=text,
        max_new_tokens=_opt_positive_int(max_tokens, "max_tokens"),
        stream=_opt_bool(body, "stream"),
        include_usage=_stream_options(body),
        model=_model(body),
        priority=_priority(body),
    )


# ----------------------------------------------------------------------------- responses


def _finish_reason_native(p: Progress) -> dict[str, Any] | None:
    if p.state == "length":
        return {"type": "length", "length": p.completion_tokens}
    if p.state == "abort":
        return {"type": "abort", "message": "Abort request"}
    return None


def generate_response(p: Progress, *, stream: bool) -> dict[str, Any]:
    """A `/generate` body or stream chunk; text and output_ids are cumulative.

    As SGLang 0.5.23: `cached_tokens_details` is null when nothing was cached, and a stream's
    chunks carry `e2e_latency` only once finished.
    """
    meta: dict[str, Any] = {
        "id": p.rid,
        "finish_reason": _finish_reason_native(p),
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": p.completion_tokens,
        "cached_tokens": p.cached_tokens,
        "cached_tokens_details": {"device": p.cached_tokens, "host": 0}
        if p.cached_tokens
        else None,
        "weight_version": "default",
    }
    if not stream or p.state != "running":
        meta["e2e_latency"] = round(p.e2e_latency, 6)
    return {
        "text": filler_text(p.completion_tokens, p.text_offset),
        "output_ids": filler_ids(p.completion_tokens, p.text_offset),
        "meta_info": meta,
    }


def _usage(p: Progress) -> dict[str, Any]:
    return {
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": p.completion_tokens,
        "total_tokens": p.prompt_tokens + p.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": p.cached_tokens},
    }


def _finish_reason_openai(p: Progress) -> str | None:
    return {"length": "length", "abort": "abort", "running": None}[p.state]


def _openai_body(
    p: Progress, model: str, obj: str, payload: dict[str, Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The OpenAI envelope every response and chunk shares, around one choice's `payload`."""
    return {
        "id": p.rid,
        "object": obj,
        "created": p.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                **payload,
                "logprobs": None,
                "finish_reason": _finish_reason_openai(p),
                "matched_stop": None,
            }
        ],
        "usage": usage,
    }


def chat_response(p: Progress, model: str) -> dict[str, Any]:
    message = {
        "role": "assistant",
        "content": filler_text(p.completion_tokens, p.text_offset),
        "reasoning_content": None,
    }
    return _openai_body(p, model, "chat.completion", {"message": message}, _usage(p))


def completion_response(p: Progress, model: str) -> dict[str, Any]:
    text = filler_text(p.completion_tokens, p.text_offset)
    return _openai_body(p, model, "text_completion", {"text": text}, _usage(p))


def chat_chunk(p: Progress, model: str, *, sent_tokens: int, role: bool = False) -> dict[str, Any]:
    """A chat stream chunk with the text produced after `sent_tokens`; `role` marks the first."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    delta["content"] = filler_text(p.completion_tokens - sent_tokens, p.text_offset + sent_tokens)
    chunk = _openai_body(p, model, "chat.completion.chunk", {"delta": delta}, None)
    del chunk["usage"]  # SGLang's chat chunks have no usage key (completion chunks: null)
    return chunk


def completion_chunk(p: Progress, model: str, *, sent_tokens: int) -> dict[str, Any]:
    text = filler_text(p.completion_tokens - sent_tokens, p.text_offset + sent_tokens)
    return _openai_body(p, model, "text_completion", {"text": text}, None)


def usage_chunk(p: Progress, model: str, kind: Kind) -> dict[str, Any]:
    """The final OpenAI stream chunk when `stream_options.include_usage` is set."""
    return {
        "id": p.rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": p.created,
        "model": model,
        "choices": [],
        "usage": _usage(p),
    }


def openai_error(
    message: str, status: int = 400, err_type: str = "BadRequestError"
) -> dict[str, Any]:
    """SGLang's OpenAI-side `ErrorResponse`."""
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status}
