"""The model endpoints' short way past aiohttp's app router (router/server/fastpath.py) and the
body read from the payload's buffer (router/server/jsonbody.py), over real sockets.

A router in front of one simulated backend gets raw HTTP/1.1 requests: the exact target
(fast path), the same target with a query string, with `Expect: 100-continue` (both through
the app), a body that arrives in two writes (not whole with its head: the await path), a
chunked request body, an oversized body, an unknown path and a wrong method. Each is answered
as before: 200 with the routed backend named, or the OpenAI-style JSON error.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from router.server.jsonbody import _whole_body
from tests.server_fixtures import serving

MODEL_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _exchange(
    url: str, *writes: bytes, pause: float = 0.0
) -> tuple[int, dict[str, str], bytes]:
    """Send `writes` (pausing between them); the response's status, headers and body."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        for i, data in enumerate(writes):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(data)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if b" 100 " in head.split(b"\r\n", 1)[0]:  # 100 Continue, then the answer
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def test_model_requests_answer_the_same_on_every_way_in() -> None:
    async with serving(1, max_body_bytes=2048) as s:
        backend = s.handles[0].url
        model = s.router.state.pool.models()[0]
        body = json.dumps({**MODEL_BODY, "model": model}).encode()
        ways = {
            "exact": [_post("/v1/chat/completions", body)],
            "query": [_post("/v1/chat/completions?x=1", body)],
            "expect": [_post("/v1/chat/completions", body, "Expect: 100-continue\r\n")],
            "split body": [_post("/v1/chat/completions", body)[:-10], body[-10:]],
            "chunked body": [
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
            ],
        }
        for way, writes in ways.items():
            status, headers, data = await _exchange(s.url, *writes, pause=0.05)
            assert status == 200, (way, data)
            assert headers["x-prefix-router-backend"] == backend, way
            assert json.loads(data)["choices"], way

        big = json.dumps({**MODEL_BODY, "model": model, "pad": "x" * 4000}).encode()
        for writes in (
            [_post("/v1/completions", big)],
            [_post("/v1/completions", big)[:-5], big[-5:]],
        ):
            status, _, data = await _exchange(s.url, *writes, pause=0.05)
            assert status == 413
            assert json.loads(data)["error"]["code"] == "request_too_large"

        status, _, data = await _exchange(s.url, _post("/v1/nothing", body))
        assert status == 404 and json.loads(data)["error"]["code"] == "not_found"
        get = b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
        status, headers, data = await _exchange(s.url, get)
        assert status == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"
        assert "POST" in headers["allow"]


async def _answers(url: str, *writes: bytes) -> list[tuple[int, bytes]]:
    """Send each of `writes` on one connection once the answers to the one before came (a
    write may hold several requests); the statuses and bodies of every answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        out = []
        for data in writes:
            writer.write(data)
            await writer.drain()
            for _ in range(data.count(b"POST ")):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await asyncio.wait_for(reader.readexactly(length), 10)
                out.append((int(head.split()[1]), body))
        return out
    finally:
        writer.close()


async def test_bodies_taken_from_the_buffer_leave_the_connection_serving() -> None:
    """The body read off the payload's buffer (jsonbody._whole_body) on one keep-alive
    connection: two requests pipelined in one write, then a body too long to arrive with its
    head (`request.read()`), then another request. Every request is answered, in order."""
    async with serving(1, max_body_bytes=1 << 20) as s:
        model = s.router.state.pool.models()[0]
        small = _post("/v1/chat/completions", json.dumps({**MODEL_BODY, "model": model}).encode())
        big = json.dumps({**MODEL_BODY, "model": model, "pad": "x" * 200_000}).encode()
        answers = await _answers(s.url, small * 2, _post("/v1/chat/completions", big), small)
        assert [status for status, _ in answers] == [200] * 4, answers
        assert all(json.loads(body)["choices"] for _, body in answers)


async def test_a_paused_or_pieced_body_is_left_to_read_nowait() -> None:
    """`_whole_body` on aiohttp's own reader: one piece, reading not paused, it takes what
    `read_nowait()` would and leaves the reader as that call does; a body whose protocol is
    still paused at its end or that came in two pieces is left to `read_nowait()`."""

    class Protocol(BaseProtocol):  # a connection without a parser or a transport
        resumed = 0

        def pause_reading(self) -> None:
            self._reading_paused = True

        def resume_reading(self, resume_parser: bool = True) -> None:
            self.resumed += 1
            self._reading_paused = False

    loop = asyncio.get_running_loop()
    protocol = Protocol(loop)
    reader = StreamReader(protocol, 2**16, loop=loop)
    reader.feed_data(b"x" * 100)
    reader.feed_eof()
    resumed = protocol.resumed
    assert _whole_body(reader) == b"x" * 100
    assert protocol.resumed == resumed and reader.is_eof() and reader.read_nowait() == b""
    assert reader.total_bytes == 100 and not reader._size and reader._cursor == 100

    protocol = Protocol(loop)
    reader = StreamReader(protocol, 2**16, loop=loop)
    reader.feed_data(b"y" * 300_000)  # past 2 x the limit: aiohttp pauses the protocol
    assert protocol._reading_paused
    reader.feed_eof()  # aiohttp 3.14 resumes at the end; one that does not leaves it paused:
    protocol.pause_reading()
    assert _whole_body(reader) is None
    assert reader.read_nowait() == b"y" * 300_000 and not protocol._reading_paused

    reader = StreamReader(Protocol(loop), 2**16, loop=loop)
    reader.feed_data(b"a")
    reader.feed_data(b"b")
    reader.feed_eof()
    assert _whole_body(reader) is None and reader.read_nowait() == b"ab"
