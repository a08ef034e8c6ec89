"""The proxy's byte-level helpers: spliced upstream bodies, lazy usage, coalesced SSE events.

These run on every request, so they avoid parsing; here each is checked against what a full
parse would say, including the awkward cases (keys already present, `[DONE]` inside generated
text, batch answers). End-to-end streaming is covered by test_server_proxy.py.
"""

from __future__ import annotations

import json
import math

import pytest

from router.server.proxy import _body_usage, _loads, _splice
from router.server.sse import first_data as _first_data
from router.server.sse import has_done as _has_done
from router.server.sse import last_data as _last_data


def test_splice_adds_keys_without_reserialising() -> None:
    raw = b' {"model": "m", "messages": [{"role": "user", "content": "h\\u00e9 \\"rid\\""}]}\n'
    body = json.loads(raw)
    out = _splice(raw, body, {"rid": "abc", "stream_options": {"include_usage": True}})
    assert json.loads(out) == {**body, "rid": "abc", "stream_options": {"include_usage": True}}
    assert out.startswith(b'{"model": "m"')  # the client's bytes, untouched
    assert json.loads(_splice(b"{}", {}, {"rid": "x"})) == {"rid": "x"}
    # a key the client sent is replaced, never duplicated
    raw = b'{"rid": "theirs", "text": "t"}'
    out = _splice(raw, json.loads(raw), {"rid": "ours"})
    assert out.count(b'"rid"') == 1 and json.loads(out)["rid"] == "ours"


def test_body_usage_reads_only_the_tail_object() -> None:
    chat = {
        "choices": [{"message": {"content": 'the word "usage": {no} and \\"usage\\"'}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {
            "cached_tokens": 4}},
    }  # fmt: skip
    usage = _body_usage(json.dumps(chat).encode(), "chat")
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (9, 2, 4)
    meta = {"prompt_tokens": 5, "completion_tokens": 1, "cached_tokens": 3, "finish_reason": None}
    gen = {"text": "x", "meta_info": meta}
    usage = _body_usage(json.dumps(gen).encode(), "generate")
    assert usage is not None and usage.cached_tokens == 3
    assert _body_usage(json.dumps([gen, gen]).encode(), "generate") is None  # a batch
    # the object is not the body's last value: decoded from where it starts
    not_last = json.dumps({"usage": {"prompt_tokens": 3}, "id": "x"}).encode() + b"\n"
    usage = _body_usage(not_last, "chat")
    assert usage is not None and usage.prompt_tokens == 3
    assert _body_usage(b'{"choices": []}', "chat") is None
    assert _body_usage(b"not json", "chat") is None


def test_sse_helpers_respect_event_boundaries() -> None:
    events = (
        b": keep-alive\n\n"
        b'data: {"text": "data: [DONE] is only text here"}\n\n'
        b'data: {"text": "second"}\n\n'
    )
    assert _first_data(events) == b'{"text": "data: [DONE] is only text here"}'
    assert _last_data(events) == b'{"text": "second"}'
    assert not _has_done(events)
    assert _has_done(events + b"data: [DONE]\n\n")
    assert _has_done(b"data:[DONE]")
    assert _first_data(b"data: [DONE]\n\n") is None
    assert _first_data(b": comment\n\n") is None


def test_loads_accepts_what_json_accepts() -> None:
    assert math.isnan(_loads(b'{"t": NaN}')["t"])  # NaN, as json reads it
    assert _loads('{"a": "é"}'.encode("utf-16")) == {"a": "é"}
    with pytest.raises(json.JSONDecodeError):
        _loads(b"{nope")
    # a re-serialised body keeps a client's big integers exact
    raw = b'{"rid": "r", "seed": 123456789012345678901234567890}'
    out = _splice(raw, _loads(raw), {"rid": "ours"})
    assert json.loads(out) == {"rid": "ours", "seed": 123456789012345678901234567890}
