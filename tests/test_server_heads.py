"""The responses whose head the router builds (router/server/heads.py) against aiohttp's own.

A real aiohttp server on loopback answers the same request twice, once through
`answer()` / `streamed()` and once through `web.Response` / `web.StreamResponse`; a raw
socket client reads both, and the bytes must be equal (the Date line aside, which may tick
between the two). Covered: HTTP/1.1 keep-alive (our heads), HTTP/1.1 close and HTTP/1.0
(aiohttp's classes behind the same functions), statuses with and without a body, a header
value aiohttp refuses, a stream of several writes and an empty stream.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion10
from aiohttp.test_utils import make_mocked_request
from conftest import serving

from router.server.heads import StreamedResponse, WholeResponse, answer, streamed

HEADERS = {
    "Content-Type": "application/json",
    "X-Request-Id": "rid-1",
    "X-Prefix-Router-Backend": "http://127.0.0.1:9",
}
BODY = b'{"choices": [], "usage": {"prompt_tokens": 3}}'
EVENTS = (b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\ndata: [DONE]\n\n')


async def _whole(request: web.Request) -> web.StreamResponse:
    status = int(request.query["status"])
    headers = {**HEADERS, **({"X-Bad": "a\nb"} if "bad" in request.query else {})}
    if request.query["kind"] == "ours":
        return answer(request, BODY, status, headers)
    return web.Response(body=BODY, status=status, headers=headers)


async def _stream(request: web.Request) -> web.StreamResponse:
    headers = {**HEADERS, "Cache-Control": "no-cache"}
    if request.query["kind"] == "ours":
        response = streamed(request, 200, headers)
    else:
        response = web.StreamResponse(status=200, headers=headers)
    await response.prepare(request)
    for event in EVENTS[: int(request.query["events"])]:
        await response.write(event)
    await response.write_eof()
    return response


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/whole", _whole)
    app.router.add_post("/stream", _stream)
    async with serving(app) as bound:
        yield bound


async def _exchange(port: int, target: str, version: str, extra: str = "") -> bytes:
    """One request on a fresh connection; the response read to its end (Date line blanked)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {target} HTTP/{version}\r\nHost: x\r\nContent-Length: 0\r\n{extra}\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lower = head.lower()
    if head[9:12] in (b"204", b"304"):
        body = b""
    elif b"transfer-encoding: chunked" in lower:
        body = await reader.readuntil(b"0\r\n\r\n")
    elif b"content-length:" in lower:
        length = int(re.search(rb"content-length: (\d+)", lower).group(1))  # type: ignore[union-attr]
        body = await reader.readexactly(length)
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return re.sub(rb"Date: [^\r]*", b"Date: -", head) + body


@pytest.mark.parametrize(
    ("version", "extra", "status"),
    [
        ("1.1", "", 200),
        ("1.1", "", 404),
        ("1.1", "", 204),
        ("1.1", "Connection: close\r\n", 200),
        ("1.0", "", 200),
        ("1.0", "Connection: keep-alive\r\n", 400),
    ],
)
async def test_whole_answer_matches_aiohttp(
    port: int, version: str, extra: str, status: int
) -> None:
    ours = await _exchange(port, f"/whole?kind=ours&status={status}", version, extra)
    theirs = await _exchange(port, f"/whole?kind=aiohttp&status={status}", version, extra)
    assert ours == theirs
    assert ours.startswith(f"HTTP/{version} {status} ".encode())


async def test_answer_class_by_case() -> None:
    """Our head only for the plain case; aiohttp's class wherever it would add or refuse."""
    plain = make_mocked_request("POST", "/v1/completions", headers={"Host": "x"})
    closing = make_mocked_request("POST", "/", headers={"Host": "x"}, version=HttpVersion10)
    assert isinstance(answer(plain, BODY, 200, HEADERS), WholeResponse)
    assert isinstance(streamed(plain, 200, HEADERS), StreamedResponse)
    assert type(answer(closing, BODY, 200, HEADERS)) is web.Response
    assert type(streamed(closing, 200, HEADERS)) is web.StreamResponse
    assert type(answer(plain, BODY, 304, HEADERS)) is web.Response
    bad = {**HEADERS, "X-Request-Id": "a\r\nInjected: 1"}
    assert type(answer(plain, BODY, 200, bad)) is web.Response  # aiohttp refuses it
    assert type(streamed(plain, 200, bad)) is web.StreamResponse


@pytest.mark.parametrize("events", [0, 1, 2])
@pytest.mark.parametrize(("version", "extra"), [("1.1", ""), ("1.1", "Connection: close\r\n")])
async def test_stream_matches_aiohttp(port: int, events: int, version: str, extra: str) -> None:
    ours = await _exchange(port, f"/stream?kind=ours&events={events}", version, extra)
    theirs = await _exchange(port, f"/stream?kind=aiohttp&events={events}", version, extra)
    assert ours == theirs
    assert ours.endswith(b"0\r\n\r\n")
    assert ours.count(b"data:") == [0, 1, 3][events]
