"""Client responses whose head is built here as bytes, byte for byte what aiohttp writes.

`web.Response` costs ~25-30 us per answer on this box before its one socket write: a
case-insensitive multidict built from the headers, content-type and body-type checks, then
`prepare()` walks `_prepare_headers` (keep-alive, chunking, length checks, Date, Server,
Connection), the app's response signals and `_serialize_headers`. A `web.StreamResponse`
pays the same and then sends its head in a write of its own, one more syscall (and one more
wake-up of the client) per stream before the first event. For what a relay sends -- HTTP/1.1,
keep-alive, a status with a body -- the outcome of all of that is fixed: the status line, our
header lines in order, then `Content-Length` (a whole answer) or `Transfer-Encoding: chunked`
(a stream), `Date` and `Server` (tests/test_server_heads.py compares them with aiohttp's).

- `answer()`: a `WholeResponse` writing head and body in one transport write when aiohttp's
  request handler prepares it.
- `streamed()`: a `StreamedResponse` whose head goes out with the first chunk of events
  (chunked, as aiohttp frames it); later writes, the end and the relay's direct transport
  writes (router/server/sse.py) are aiohttp's chunked writer's as before.

Any other case (HTTP/1.0, a client that asked to close, a status without a body, a header
value aiohttp would refuse) gets aiohttp's own response class, so the behaviour there is
aiohttp's.
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

__all__ = ["StreamedResponse", "WholeResponse", "answer", "streamed"]

# what aiohttp's header serialiser refuses in a name or value (header injection)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SERVER = "\r\nServer: " + SERVER_SOFTWARE + "\r\n\r\n"


def _lines(request: BaseRequest, status: int, headers: Mapping[str, str]) -> str | None:
    """Our header lines, when aiohttp would add only the fixed ones to them; else None."""
    if (
        request.version != HttpVersion11
        or not request.keep_alive
        or request.method == "HEAD"
        or not 200 <= status < 600
        or status in (204, 304)
        or _FORBIDDEN.search("".join([*headers, *headers.values()])) is not None
    ):
        return None
    return "".join([f"{name}: {value}\r\n" for name, value in headers.items()])


def _status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {REASON_PHRASES.get(status, '')}\r\n"


def _write(request: BaseRequest, writer: AbstractStreamWriter, data: bytes) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("Cannot write to closing transport")
    writer.output_size += len(data)
    transport.write(data)


def answer(
    request: BaseRequest, body: bytes, status: int, headers: Mapping[str, str]
) -> web.StreamResponse:
    """A whole answer: a `WholeResponse` where its head is aiohttp's, else `web.Response`."""
    lines = _lines(request, status, headers)
    if lines is None:
        return web.Response(body=body, status=status, headers=headers)
    return WholeResponse(status, lines, body)


def streamed(request: BaseRequest, status: int, headers: Mapping[str, str]) -> web.StreamResponse:
    """A stream's response: a `StreamedResponse` where its head is aiohttp's, else aiohttp's."""
    lines = _lines(request, status, headers)
    if lines is None:
        return web.StreamResponse(status=status, headers=headers)
    return StreamedResponse(status, lines)


class _BytesHead(web.StreamResponse):
    """A response that writes its own head (`lines` plus the framing line) as bytes."""

    def __init__(self, status: int, lines: str) -> None:
        super().__init__(status=status)
        self._lines = lines

    def _head_bytes(self, framing: str) -> bytes:
        return (
            f"{_status_line(self._status)}{self._lines}{framing}\r\n"
            f"Date: {rfc822_formatted_time()}{_SERVER}"
        ).encode()

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        writer = self._payload_writer = request._payload_writer
        self._req = request
        self._keep_alive = True
        self._open(request, writer)
        return writer

    def _open(self, request: BaseRequest, writer: AbstractStreamWriter) -> None:
        raise NotImplementedError


class WholeResponse(_BytesHead):
    """Head and body as one write; `headers` stays empty (the head is `lines`)."""

    def __init__(self, status: int, lines: str, body: bytes) -> None:
        super().__init__(status, lines)
        self._whole = body

    def _open(self, request: BaseRequest, writer: AbstractStreamWriter) -> None:
        body = self._whole
        _write(request, writer, self._head_bytes(f"Content-Length: {len(body)}") + body)


class StreamedResponse(_BytesHead):
    """A chunked response whose head waits for the first write (one syscall for both)."""

    def __init__(self, status: int, lines: str) -> None:
        super().__init__(status, lines)
        self._head: bytes | None = None
        self._end_written = False

    def _open(self, request: BaseRequest, writer: AbstractStreamWriter) -> None:
        writer.enable_chunking()
        self._head = self._head_bytes("Transfer-Encoding: chunked")

    def send_head(self) -> None:
        """Write the head now if it has not gone out (before writing to the transport)."""
        head, self._head = self._head, None
        if head is not None:
            assert self._req is not None and self._payload_writer is not None
            _write(self._req, self._payload_writer, head)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        head, self._head = self._head, None
        if head is None or not data:
            if head is not None:
                self._head = head
                self.send_head()
            await super().write(data)
            return
        assert self._req is not None and self._payload_writer is not None
        chunk = b"%b%x\r\n" % (head, len(data))
        _write(self._req, self._payload_writer, b"".join((chunk, data, b"\r\n")))

    def end_written(self) -> None:
        """The relay wrote the body's end (the terminal chunk) with its last events, straight
        to the transport: `write_eof` only closes the books (one write per stream less)."""
        self._end_written = True

    async def write_eof(self, data: bytes = b"") -> None:
        if self._end_written and not data and self._head is None:
            if not self._eof_sent:  # what aiohttp's write_eof records, without the write
                writer = self._payload_writer
                self._eof_sent = True
                self._req = None
                self._body_length = writer.output_size if writer is not None else 0
                self._payload_writer = None
            return
        self.send_head()
        await super().write_eof(data)
