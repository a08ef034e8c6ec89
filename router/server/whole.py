"""A whole (non-streamed) answer whose head is built as bytes here, not by aiohttp.

`web.Response` costs ~25-30 us per answer on this box before its one socket write: a
case-insensitive multidict built from the headers, content-type and body-type checks, then
`prepare()` walks `_prepare_headers` (keep-alive, chunking, length checks, Date, Server,
Connection), the app's response signals and `_serialize_headers`. For the answer a relay sends
most -- HTTP/1.1, keep-alive, a body with a status that has one -- the outcome of all of that
is fixed: the status line, our header lines in order, `Content-Length`, `Date` and `Server`,
exactly what aiohttp would write (tests/test_server_whole.py compares the two). `answer()`
builds a `WholeResponse` for that case, which writes head and body in one transport write
when aiohttp's request handler prepares it; any other case (HTTP/1.0, a client that asked to
close, a status without a body, a header value aiohttp would refuse) gets a `web.Response`,
so the behaviour there is aiohttp's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES

__all__ = ["WholeResponse", "answer"]

# what aiohttp's header serialiser refuses in a name or value (header injection)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TAIL = "\r\nServer: " + SERVER_SOFTWARE + "\r\n\r\n"


def answer(
    request: BaseRequest, body: bytes, status: int, headers: Mapping[str, str]
) -> web.StreamResponse:
    """The client's response: a `WholeResponse` where its head is aiohttp's, else aiohttp's."""
    if (
        request.version == HttpVersion11
        and request.keep_alive
        and request.method != "HEAD"
        and 200 <= status < 600
        and status not in (204, 304)
    ):
        if _FORBIDDEN.search("".join([*headers, *headers.values()])) is None:
            lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
            return WholeResponse(status, lines, body)
    return web.Response(body=body, status=status, headers=headers)


class WholeResponse(web.StreamResponse):
    """Head and body as one write; `headers` stays empty (the head is `lines`)."""

    def __init__(self, status: int, lines: str, body: bytes) -> None:
        super().__init__(status=status)
        self._lines = lines
        self._whole = body

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        writer = self._payload_writer = request._payload_writer
        self._req = request
        self._keep_alive = True
        body = self._whole
        head = (
            f"HTTP/1.1 {self._status} {REASON_PHRASES.get(self._status, '')}\r\n{self._lines}"
            f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}{_TAIL}"
        ).encode()
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        data = head + body
        writer.output_size += len(data)
        transport.write(data)
        return writer
