"""Server-sent events as the relay sees them: only what feedback needs is parsed.

`SseRelay` is the sink of one streamed response (router/server/upstream.py calls it from the
backend's read callback): each read's complete events go to the client's transport in one
write (an incomplete tail waits for the next read), the first data event is the first token
(and, on /generate, says cached tokens), an OpenAI event holding `usage` is handed to the
proxy (which reads it and may drop it), and a /generate stream's last run of data events is
kept for its final counts. Nothing here awaits: a sink runs inside `data_received`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from backends.sglang import usage_from_sse_chunk
from router.server.jsonbody import loads as _loads

__all__ = [
    "DRAIN_ABOVE",
    "ClientGone",
    "SseRelay",
    "data_of",
    "early_cached",
    "first_data",
    "has_done",
    "has_usage",
    "last_data",
    "split_events",
    "usage_at",
]

# A client transport's buffer above this asks the relay to pause the backend until it drains
# (asyncio's default high-water mark: aiohttp's writer pauses at the same size).
DRAIN_ABOVE = 64 * 1024


class ClientGone(Exception):
    """A write to the client failed: it went away. Never the backend's fault."""


class SseRelay:
    """One stream's relay state: events out, feedback in; called once per upstream read."""

    __slots__ = (
        "chunked",
        "done",
        "ended",
        "first_seen",
        "generate",
        "last_data",
        "may_end",
        "on_first",
        "on_usage",
        "pending",
        "transport",
    )  # fmt: skip

    def __init__(
        self,
        *,
        generate: bool,
        on_first: Callable[[int | None], None],
        on_usage: Callable[[bytes], bytes],
    ) -> None:
        self.generate = generate
        self.on_first = on_first  # the first token, with cached tokens when known
        self.on_usage = on_usage  # events holding a usage object -> what the client gets
        self.pending = b""  # bytes after the last complete event
        self.last_data = b""  # generate: the latest run of events that held data
        self.done = False  # `data: [DONE]` passed
        self.first_seen = False
        self.transport: asyncio.Transport | None = None
        self.chunked = True
        self.may_end = False  # the relay may write the body's end (the response knows: ended)
        self.ended = False  # it did: the terminal chunk went with the last events

    def events_of(self, chunk: bytes) -> bytes:
        """The complete events of `pending + chunk`, after feedback (b"": none complete yet)."""
        data = self.pending + chunk if self.pending else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.pending = data
            return b""
        events, self.pending = data[: cut + 2], data[cut + 2 :]
        if not self.first_seen:
            first = first_data(events)
            if first is not None:
                self.first_seen = True
                self.on_first(early_cached(self.generate, first))
        if self.generate:
            if b"data:" in events:
                self.last_data = events
        elif has_usage(events):
            events = self.on_usage(events)
        if not self.done and events.rfind(b"[DONE]") >= 0:
            self.done = has_done(events)
        return events

    def raw_sink(self) -> Callable[[bytes, bool], bool | None] | None:
        """`raw` where whole chunks may pass as they came: not for /generate (its last event
        is kept, de-chunked) nor for a client without chunked encoding."""
        return None if self.generate or not self.chunked else self.raw

    def raw(self, framed: bytes, ended: bool) -> bool | None:
        """Whole upstream chunks passed on as they came (the client's framing is the same),
        with the terminal chunk when `ended` and the stream is complete (`may_end`); None when
        this read needs the payload path (an unfinished event pending, the first event not
        seen, a usage event that is not a chunk of its own).

        An event holding a usage object is cut out of its chunk and handed to `on_usage`
        alone, its chunk re-framed or dropped; the other chunks pass untouched. Searches run
        backwards (`rfind`: twice as fast as `in` over SSE text, a read of 100+ events at
        saturation) and `"usage":` is looked for once before its two exact spellings.
        """
        if self.pending or not self.first_seen:
            return None
        if framed.rfind(b'"usage":') >= 0 and has_usage(framed):
            cut = _usage_chunks(framed, self.on_usage)
            if cut is None:
                return None
            framed = cut
        if not self.done and framed.rfind(b"[DONE]") >= 0:
            self.done = has_done(framed)
        if ended:
            if self.done and self.may_end:
                self.ended = True  # the end goes with the events: one write, not two
            else:
                framed = framed[:-5]  # the proxy ends the body (an error event first)
        return self._send(framed)

    def __call__(self, chunk: bytes) -> bool:
        """The upstream sink: write the read's events; True when the client's buffer is full."""
        events = self.events_of(chunk)
        return self._send(
            b"%x\r\n%b\r\n" % (len(events), events) if events and self.chunked else events
        )

    def _send(self, data: bytes) -> bool:
        """Write `data` to the client (ClientGone if it left); True when its buffer is full."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        if data:
            transport.write(data)
        return transport.get_write_buffer_size() > DRAIN_ABOVE


def _usage_chunks(framed: bytes, on_usage: Callable[[bytes], bytes]) -> bytes | None:
    """Whole chunks with each event holding a usage object replaced by `on_usage(event)`
    (re-framed; dropped when that is empty); None unless each such event is one chunk's
    whole payload, as SGLang sends them (then the payload path, which cuts events out of the
    de-chunked text, reads it: the same event either way).

    `framed` is whole chunks (the connection checked them), walked from the start to the last
    chunk holding a usage object.
    """
    out: list[bytes] = []
    kept = pos = 0  # framed[kept:pos] passes untouched
    at = usage_at(framed, 0)
    while at >= 0:
        end = framed.find(b"\r\n", pos)
        try:
            size = int(framed[pos:end], 16)
        except ValueError:
            return None
        if not size:
            return None  # the terminal chunk: no usage past it (not reached)
        start, stop = end + 2, end + 2 + size
        if at >= stop + 2:  # not this chunk: the next one
            pos = stop + 2
            continue
        if (
            at < start
            or framed.find(b"\n\n", start, stop) != stop - 2
            or (pos and framed[pos - 4 : pos - 2] != b"\n\n")
        ):
            return None  # the usage event is not this chunk's whole payload
        event = framed[start:stop]
        replacement = on_usage(event)
        if replacement != event:
            out.append(framed[kept:pos])
            if replacement:
                out.append(b"%x\r\n%b\r\n" % (len(replacement), replacement))
            kept = stop + 2
        pos = stop + 2
        at = usage_at(framed, pos)
    if not out:
        return framed
    out.append(framed[kept:])
    return b"".join(out)


def usage_at(data: bytes, start: int) -> int:
    """Where the next usage object starts at or after `start` (-1: none); see `has_usage`."""
    spaced, compact = data.find(b'"usage": {', start), data.find(b'"usage":{', start)
    if spaced < 0 or 0 <= compact < spaced:
        return compact
    return spaced


def has_usage(data: bytes) -> bool:
    """An OpenAI chunk with a usage object (SGLang sends `"usage": null` on the others).

    Two substring tests (pydantic's compact JSON, json.dumps' spaced) cost far less than a
    regular expression over every read; other spellings are missed (no feedback, no harm).
    Backwards: CPython's `rfind` walks SSE text twice as fast as `in` does.
    """
    return data.rfind(b'"usage": {') >= 0 or data.rfind(b'"usage":{') >= 0


def split_events(events: bytes) -> list[bytes]:
    """Complete SSE events (each ending in a blank line) one by one."""
    parts = events.split(b"\n\n")
    return [part + b"\n\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def data_of(event: bytes) -> bytes | None:
    """The payload of a `data:` event, None for comments and other fields."""
    text = event.strip()
    if not text.startswith(b"data:"):
        return None
    return text[5:].strip()


def first_data(events: bytes) -> bytes | None:
    """The first data payload other than [DONE] (the first token), if any.

    Event by event from the start (a stream's first read may hold a hundred events: they
    are not split into a list to look at the first)."""
    if b"data:" not in events:
        return None
    start, size = 0, len(events)
    while start < size:
        end = events.find(b"\n\n", start)
        data = data_of(events[start:] if end < 0 else events[start:end])
        if data is not None and data != b"[DONE]":
            return data
        if end < 0:
            break
        start = end + 2
    return None


def last_data(events: bytes) -> bytes | None:
    """The last data payload other than [DONE] (a /generate stream's final counts)."""
    for event in reversed(split_events(events)):
        data = data_of(event)
        if data is not None and data != b"[DONE]":
            return data
    return None


def has_done(events: bytes) -> bool:
    """Whether a line of `events` is `data: [DONE]` (JSON strings cannot hold a raw newline,
    so a `[DONE]` inside generated text never sits on a line of its own)."""
    at = events.find(b"[DONE]")
    while at >= 0:
        start = events.rfind(b"\n", 0, at) + 1
        end = events.find(b"\n", at)
        line = events[start : end if end >= 0 else len(events)].strip()
        if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
            return True
        at = events.find(b"[DONE]", at + 6)
    return False


def early_cached(generate: bool, data: bytes) -> int | None:
    """Cached tokens known at the first chunk: SGLang's /generate chunks carry meta_info."""
    if not generate:
        return None  # OpenAI streams report usage only in their last chunk
    try:
        usage = usage_from_sse_chunk(_loads(data))
    except ValueError:
        return None
    return usage.cached_tokens if usage is not None else None
