"""A stream's last read through the router, over real sockets: usage and the body's end.

A scripted backend (asyncio, loopback) sends an SSE stream in reads laid out byte for byte;
a raw-socket client reads the router's chunked answer and then sends a second request on the
same connection. What must hold however the relay handles the last read (whole chunks passed
as they came with the usage chunk cut out and the terminal chunk in the same write, or the
de-chunked payload path): the client gets exactly the events it would get from the payload
path, in valid chunked framing ending once, the connection stays usable, and the router reads
the usage the backend reported.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from server_fixtures import read_request, router_for, scripted_server

MODEL = "m"
INFO = json.dumps({"served_model_name": MODEL, "max_total_num_tokens": 50_000}).encode()
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in payloads)


def _token(i: int) -> bytes:
    return _event({"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]})  # fmt: skip


USAGE = _event({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {
    "prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
    "prompt_tokens_details": {"cached_tokens": 32}}})  # fmt: skip
DONE = b"data: [DONE]\n\n"
END = b"0\r\n\r\n"


def _backend(reads: list[bytes]) -> AbstractAsyncContextManager[str]:
    """Discovery and health answered; each POST gets `reads`, one socket write each, apart."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request = await read_request(reader)
            if request.startswith(b"GET"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (len(INFO), INFO)
                )
                continue
            for i, piece in enumerate(reads):
                if i:
                    await asyncio.sleep(0.02)  # one read each on the router's side
                writer.write(piece)
                await writer.drain()

    return scripted_server(script)


async def _chunked_body(reader: asyncio.StreamReader) -> list[bytes]:
    """The payloads of one chunked body, up to and with its terminal chunk."""
    payloads = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if not size:
            assert await reader.readexactly(2) == b"\r\n"  # no trailers
            return payloads
        payloads.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"


async def _streams(url: str, body: dict[str, Any], count: int = 2) -> list[bytes]:
    """`count` streams on one keep-alive connection; the first one's events (all the same)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(data), data)
    )
    bodies = []
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
        bodies.append(b"".join(await _chunked_body(reader)))
    writer.write_eof()  # nothing else came: the end was written once per stream
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert bodies == bodies[:1] * count
    return [event + b"\n\n" for event in bodies[0].split(b"\n\n") if event]


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3, **extra}  # fmt: skip


LAST_READS = {
    # usage, [DONE] and the end in one read, one chunk each (SGLang's layout)
    "own chunks": [_chunk(USAGE), _chunk(DONE) + END],
    "one read": [_chunk(USAGE, DONE) + END],
    # the usage event shares its chunk with the token before it: the payload path
    "shared chunk": [_chunk(_token(2) + USAGE, DONE) + END],
    # split across chunks: the payload path joins it
    "split event": [_chunk(USAGE[:30], USAGE[30:], DONE) + END],
    # the end in a read of its own
    "end alone": [_chunk(USAGE, DONE), END],
}


@pytest.mark.parametrize("layout", list(LAST_READS))
@pytest.mark.parametrize("include_usage", [False, True])
async def test_last_read_usage_and_end(layout: str, include_usage: bool) -> None:
    tokens = [_token(0), _token(1)] + ([] if layout == "shared chunk" else [_token(2)])
    reads = [SSE_HEAD, _chunk(tokens[0]), _chunk(*tokens[1:]), *LAST_READS[layout]]
    body = _chat(stream_options={"include_usage": True}) if include_usage else _chat()
    async with _backend(reads) as url, router_for([url], policy="round_robin") as router:
        events = await _streams(router.url, body)
        metrics = router.state.proxy.metrics
        assert metrics.prompt_tokens.total() == 80  # the usage was read, both times
        assert metrics.reported_cached.total() == 64
    want = [_token(0), _token(1), _token(2), *([USAGE] if include_usage else []), DONE]
    assert events == want


async def test_missing_done_gets_an_error_event_then_one_end() -> None:
    reads = [SSE_HEAD, _chunk(_token(0)), _chunk(_token(1)) + END]  # no [DONE]
    async with _backend(reads) as url, router_for([url], policy="round_robin") as router:
        events = await _streams(router.url, _chat(), 1)  # a broken stream opens the breaker
    assert events[:2] == [_token(0), _token(1)]
    assert len(events) == 3 and b'"error"' in events[2]
