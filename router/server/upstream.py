"""A small HTTP/1.1 client for the model requests: backend bytes reach us in the read callback.

Why not aiohttp's client for these: each streamed read there passes through the response
parser, a `StreamReader`, a waiter future and a task step before the relay sees it, and the
relay's `await response.write()` is a coroutine on the other side. A router relaying tens of
thousands of SSE events a second spends most of its CPU on that machinery (cProfile: aiohttp
57% of the per-stream CPU, benchmarks/overhead.md). Here the read callback (`asyncio.Protocol.
data_received`) undoes the chunked framing and hands the payload to a *sink*, a plain function
that writes straight to the client's transport; the handler's coroutine wakes only when the
response ends, breaks or the client's buffer needs draining.

Chunked framing is read two ways: a read that starts at a chunk boundary (nearly every read of
a stream: one or a few whole chunks) is walked chunk by chunk by `_whole_chunks`, which either
passes the read on still framed (a raw sink) or collects its payloads; only what that walk
leaves -- a chunk split across reads, an extension, trailers -- goes through the byte-level
state machine `_dechunk`, from where the walk stopped.

Scope, which is what SGLang's HTTP servers (uvicorn) and the simulated ones (aiohttp) need:
POST with a bytes body over http:// or https://, keep-alive connections per host, responses
framed by Content-Length, chunked encoding or the connection's close. aiohttp's session stays
for everything else (health checks, aborts, admin calls, the PD prefill side).

A request written on a pooled connection that the server closed meanwhile (its keep-alive
timeout) fails before any response byte: it is written again once on a fresh connection, so a
stale socket never counts as the backend's failure (urllib3 does the same).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import repeat
from typing import TypeVar, cast

from yarl import URL

__all__ = ["Target", "Upstream", "UpstreamError", "UpstreamResponse"]

# A sink gets each read's payload and says whether the client's buffer wants draining.
Sink = Callable[[bytes], bool]
# A raw sink gets whole chunks still framed (to pass them on as they are) and whether they end
# with the terminal chunk (`0\r\n\r\n`, the body's last 5 bytes then): its drain answer, or
# None when it cannot take them raw (then the payload goes to the sink).
RawSink = Callable[[bytes, bool], bool | None]
_T = TypeVar("_T")

_MAX_HEAD = 64 * 1024
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class UpstreamError(Exception):
    """The exchange failed: refused, reset, closed early, malformed or timed out."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one backend path lives, parsed once (`Upstream.target`)."""

    host: str
    port: int
    tls: bool
    request_line: bytes  # b"POST /path HTTP/1.1\r\nHost: h:p\r\n"

    @property
    def key(self) -> tuple[str, int, bool]:
        return self.host, self.port, self.tls


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self.loop = loop
        self.read_timeout_s = read_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # reading paused while the client drains (not the backend's silence)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response
        self.last_read = 0.0
        self._head = b""
        self._head_waiter: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self._done: asyncio.Future[bool] | None = None  # True: ended; False: wants a drain
        self._mode = 0  # 0 no body / 1 length / 2 chunked / 3 until close
        self._left = 0
        self._chunk_state = _SIZE
        self._chunk_buf = b""
        self._held: list[bytes] = []  # payload before a sink was attached
        self._sink: Sink | None = None
        self._raw: RawSink | None = None
        self.keep_alive = False
        self.finished = False  # the current response's body is complete
        self.error: BaseException | None = None

    # ----- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        raw = self._raw  # attached only once the head is in: got_bytes is True already
        if raw is not None and self._mode == 2 and self._chunk_state == _SIZE:
            # a stream's read of whole chunks goes to the raw sink as it came (inlined: this
            # runs once per upstream read of every stream)
            whole, ended = _whole_chunks(data) if not self._chunk_buf else (-1, False)
            if whole == len(data) or (ended and whole >= 0):
                try:
                    drain = raw(data, ended)
                except BaseException as exc:  # the sink's error ends the exchange (client gone)
                    self._fail(exc)
                    return
                if drain is not None:  # None: not taken raw, the payload path below
                    if ended:
                        self._finish()
                    elif drain:
                        self._ask_drain()
                    return
        self.got_bytes = True
        if self._head_waiter is not None:
            self._on_head_bytes(data)
        elif self._done is not None:  # set with the head: a body, or bytes past its end
            self._on_body(data)
        else:  # bytes on an idle connection: nothing may be trusted on it any more
            self._fail(UpstreamError("unexpected bytes on an idle connection"))

    def eof_received(self) -> bool | None:
        if self._mode == 3 and not self.finished:  # a body framed by the close ends here
            self._mode = 0
            self._finish()
        self.keep_alive = False
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self.keep_alive = False
        if not self.finished and (self._head_waiter is not None or self._done is not None):
            reason = f"connection lost: {exc!r}" if exc else "server closed the connection"
            self._fail(UpstreamError(reason))

    # ----- one exchange ------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> asyncio.Future[tuple[int, dict[str, str]]]:
        assert self.transport is not None
        self.got_bytes = self.finished = False
        self.error = None
        self._head, self._mode, self._chunk_state, self._chunk_buf = b"", 0, _SIZE, b""
        self._held, self._sink, self._raw, self._done, self._left = [], None, None, None, 0
        self._head_waiter = self.loop.create_future()
        self.last_read = time.monotonic()
        if self._timer is None:  # else the last exchange's timer, still pending, serves this one
            self._timer = self.loop.call_later(self.read_timeout_s, self._check_silence)
        # one write, one segment: `writelines` may send the head alone, waking the backend
        # for half a request (on uvloop it cost 8x aiohttp's single write per short request)
        self.transport.write(head + body)
        return self._head_waiter

    def _check_silence(self) -> None:
        """The read timeout: fires once per period, not re-armed on every read.

        An exchange that ends leaves its timer pending (a cancel and a new timer for each
        request on a kept-alive connection cost ~1.1 us): the next `send` resets `last_read`,
        so this fires when that exchange has been silent for the period, as a timer of its
        own would; on an idle connection it ends here.
        """
        if self.finished:
            self._timer = None
            return
        silent = time.monotonic() - self.last_read
        if self._paused or silent < self.read_timeout_s:
            wait = self.read_timeout_s - (0.0 if self._paused else silent)
            self._timer = self.loop.call_later(wait, self._check_silence)
            return
        self._timer = None
        self._fail(TimeoutError(f"no byte from the backend for {silent:.0f} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_head_bytes(self, data: bytes) -> None:
        head = self._head + data if self._head else data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_HEAD:
                self._fail(UpstreamError("response head over 64 KiB"))
            self._head = head
            return
        try:
            status, headers, version = _parsed_head(head[:end])
        except ValueError as exc:
            self._fail(UpstreamError(f"malformed response head: {exc}"))
            return
        rest = head[end + 4 :]
        if 100 <= status < 200:  # 100 Continue and friends: the real head follows
            self._head = b""
            if rest:
                self._on_head_bytes(rest)
            return
        self._head = b""
        connection = headers.get("connection", "").lower()
        self.keep_alive = version == b"HTTP/1.1" and "close" not in connection
        if status in (204, 304):
            self._mode = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = 2
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                self._fail(UpstreamError("malformed Content-Length"))
                return
            self._mode = 1 if self._left else 0
        else:
            self._mode, self.keep_alive = 3, False
        waiter, self._head_waiter = self._head_waiter, None
        self._done = self.loop.create_future()
        if not self._mode:
            self._finish()
        elif rest:
            self._on_body(rest)
        if waiter is not None and not waiter.done():
            waiter.set_result((status, headers))

    def _on_body(self, data: bytes) -> None:
        mode = self._mode
        if mode == 2:
            payload, ended = self._payload_of(data)
        elif mode == 1:
            if len(data) > self._left:
                data = data[: self._left]
                self.keep_alive = False  # bytes past the body: the connection is not reusable
            self._left -= len(data)
            payload, ended = data, self._left == 0
        elif mode == 3:
            payload, ended = data, False
        else:
            self._fail(UpstreamError("bytes after the response ended"))
            return
        if payload:
            sink = self._sink
            if sink is None:
                self._held.append(payload)
            else:
                try:
                    drain = sink(payload)
                except BaseException as exc:  # the sink's error ends the exchange (client gone)
                    self._fail(exc)
                    return
                if drain and not ended:
                    self._ask_drain()
        if ended:
            self._finish()

    def _payload_of(self, data: bytes) -> tuple[bytes, bool]:
        """The payload of a chunked read, and whether the terminal chunk passed.

        A read that starts at a chunk boundary (the usual case: a stream's read is one or a
        few whole chunks) is walked by `_whole_chunks`, chunk by chunk, and only what it leaves
        (a chunk split across reads, an extension) goes through the state machine (`_dechunk`).
        """
        if self._chunk_state != _SIZE or self._chunk_buf:
            parts, ended = self._dechunk(data)
        else:
            parts = []
            whole, ended = _whole_chunks(data, parts)
            if whole < 0:  # malformed or an extension: the state machine says which
                parts, ended = self._dechunk(data)
            elif ended:
                self._chunk_state = _TRAILER
            elif whole < len(data):
                rest, ended = self._dechunk(data[whole:])
                parts += rest
        return (parts[0] if len(parts) == 1 else b"".join(parts)), ended

    def _dechunk(self, data: bytes) -> tuple[list[bytes], bool]:
        """The payload pieces of chunked `data` and whether the terminal chunk passed."""
        if self._chunk_buf:
            data, self._chunk_buf = self._chunk_buf + data, b""
        out: list[bytes] = []
        pos, size = 0, len(data)
        state = self._chunk_state
        while pos < size:
            if state == _DATA:
                take = min(self._left, size - pos)
                out.append(data[pos : pos + take] if take != size else data)
                pos += take
                self._left -= take
                if not self._left:
                    state = _CRLF
            elif state == _SIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._chunk_buf = data[pos:]
                    break
                line = data[pos:end]
                if b";" in line:  # chunk extensions: ignored
                    line = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(line, 16)
                except ValueError:
                    self._chunk_state = state
                    self._fail(UpstreamError(f"malformed chunk size {line[:20]!r}"))
                    return out, False
                pos = end + 2
                state = _DATA if self._left else _TRAILER
            elif state == _CRLF:
                if size - pos < 2:
                    self._chunk_buf = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    self._fail(UpstreamError("chunk without its CRLF"))
                    return out, False
                pos += 2
                state = _SIZE
            else:  # _TRAILER: header lines until an empty one
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._chunk_buf = data[pos:]
                    break
                if end == pos:
                    self._chunk_state = state
                    if end + 2 < size:
                        self.keep_alive = False
                    return out, True
                pos = end + 2
        self._chunk_state = state
        return out, False

    def _finish(self) -> None:
        self.finished = True  # the read timer stays for the next exchange (`_check_silence`)
        self._mode = 0
        done = self._done
        if done is not None and not done.done():
            done.set_result(True)

    def _fail(self, exc: BaseException) -> None:
        self._stop_timer()
        if self.error is None:  # the first cause stays (a sink's error, then the close)
            self.error = exc
        self.keep_alive = False
        for waiter in (self._head_waiter, self._done):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: the owner may be gone (a cancelled request)
        if self.transport is not None:
            self.transport.close()

    # ----- the body, for the owner -------------------------------------------------------

    def attach(self, sink: Sink | None, raw: RawSink | None = None) -> list[bytes]:
        """Deliver what comes next to `sink` (whole chunks to `raw` when it takes them);
        returns the payload that arrived before."""
        held, self._held = self._held, []
        self._sink, self._raw = sink, raw
        return held

    def notify(self) -> None:
        """Wake the owner (its `wakeup` future: False, not the end); reading goes on."""
        done = self._done
        if done is not None and not done.done():
            done.set_result(False)

    def _ask_drain(self) -> None:
        """The client's buffer is full: stop reading and wake the owner to drain it."""
        self.pause()
        self.notify()

    def pause(self) -> None:
        """Stop reading until `wakeup` (the client's buffer is full)."""
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def wakeup(self) -> asyncio.Future[bool]:
        """The owner's next wake-up: True at the end, False for a drain, or the error.

        Called after the owner drained: reading paused for that drain resumes here.
        """
        done = self._done
        if self.error is not None or self.finished:
            done = self.loop.create_future()
            if self.error is not None:
                done.set_exception(self.error)
            else:
                done.set_result(True)
        elif done is None or done.done() or self._paused:
            done = self.loop.create_future()
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
        self._done = done
        return done

    def close(self) -> None:
        self._stop_timer()
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A response whose head arrived; its body is read whole (`read`) or relayed (`relay`)."""

    def __init__(
        self, upstream: Upstream, key: tuple[str, int, bool], conn: _Connection,
        status: int, headers: dict[str, str],
    ) -> None:  # fmt: skip
        self.status = status
        self.headers = headers
        self._upstream = upstream
        self._key = key
        self._conn = conn
        self._released = False

    async def read(self) -> bytes:
        """The whole body (a non-streaming answer, an error's text)."""
        conn = self._conn
        parts = conn.attach(None)
        await self._upstream.wait(conn, conn.wakeup())
        parts += conn.attach(None)
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def next_payload(self) -> bytes:
        """The payload of the next read (and of any read before the owner runs); b"" once the
        body ended. Reading is not paused for it (a pause and a resume: two syscalls a
        stream): what comes after is held for the next `attach`."""
        conn = self._conn
        got = conn.attach(None)
        if not got and not conn.finished:

            def collect(data: bytes) -> bool:
                got.append(data)
                conn.notify()
                return False

            conn.attach(collect)
            await self._upstream.wait(conn, conn.wakeup())
            got += conn.attach(None)
        return got[0] if len(got) == 1 else b"".join(got)

    async def relay(
        self, sink: Sink, drain: Callable[[], Awaitable[None]], raw: RawSink | None = None
    ) -> None:
        """Hand each read's payload to `sink` until the body ends; `drain` when it asks.

        With `raw`, a chunked read made of whole chunks goes to it still framed (chunked
        pass-through: no de-chunking, no copy) unless it declines that read.
        """
        conn = self._conn
        held = conn.attach(sink, raw)
        if held and sink(b"".join(held)):
            conn.pause()
            await drain()
        while not await self._upstream.wait(conn, conn.wakeup()):
            await drain()
        self.release()

    def release(self) -> None:
        """Back to the pool when the body ended cleanly, else closed; idempotent."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.attach(None)
        if conn.finished and conn.keep_alive and not conn.closed:
            self._upstream.put_back(self._key, conn)
        else:
            conn.close()


class Upstream:
    """Keep-alive connections per backend and the one exchange the proxy needs (POST)."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, idle_timeout_s: float = 15.0
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        # newest last: reuse the warmest; the oldest (first) are pruned as new ones come back
        self._idle: dict[tuple[str, int, bool], deque[_Connection]] = {}
        self._targets: dict[str, Target] = {}
        self._ssl: ssl.SSLContext | None = None

    def target(self, url: str) -> Target:
        """`url` parsed once (the proxy asks per request)."""
        found = self._targets.get(url)
        if found is None:
            parsed = URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise ValueError(f"not an http(s) URL: {url}")
            tls = parsed.scheme == "https"
            port = parsed.port or (443 if tls else 80)
            host_header = parsed.raw_host or parsed.host
            if ":" in host_header:  # IPv6 literal
                host_header = f"[{host_header}]"
            if parsed.port is not None and not parsed.is_default_port():
                host_header = f"{host_header}:{port}"
            line = f"POST {parsed.raw_path_qs or '/'} HTTP/1.1\r\nHost: {host_header}\r\n"
            found = Target(parsed.host, port, tls, line.encode("latin-1"))
            if len(self._targets) > 4096:
                self._targets.clear()
            self._targets[url] = found
        return found

    async def post(self, target: Target, body: bytes, headers: bytes) -> UpstreamResponse:
        """POST `body`; returns once the response head arrived. `headers`: b"Name: v\\r\\n"...

        Raises `UpstreamError` (refused, reset, closed before the head, malformed) or
        `TimeoutError` (connect or read timeout).
        """
        head = b"%bContent-Length: %d\r\n%b\r\n" % (target.request_line, len(body), headers)
        key = target.key
        while True:
            conn = self._pooled(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target)
            try:
                status, parsed = await self.wait(conn, conn.send(head, body))
            except UpstreamError:
                conn.close()  # (a read timeout, TimeoutError, is never written again)
                if reused and not conn.got_bytes:
                    continue  # the server dropped an idle connection: write it again, fresh
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, key, conn, status, parsed)

    async def wait(self, conn: _Connection, waiter: asyncio.Future[_T]) -> _T:
        """`waiter`'s result; a cancelled wait (the client went away) closes the connection."""
        try:
            return await waiter
        except asyncio.CancelledError:
            conn.close()
            raise

    def _pooled(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_timeout_s:
                return conn
            conn.close()
        return None

    def put_back(self, key: tuple[str, int, bool], conn: _Connection) -> None:
        """Pool `conn`; close the oldest idle ones that timed out or that the server closed
        (after a burst, LIFO reuse would otherwise keep them open, unused, for good)."""
        now = conn.idle_since = time.monotonic()
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.idle_timeout_s):
            idle.popleft().close()
        idle.append(conn)

    def idle_count(self, key: tuple[str, int, bool]) -> int:
        """Pooled connections to one backend (for tests and /stats)."""
        return len(self._idle.get(key, ()))

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if target.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop, self.read_timeout_s),
                    target.host,
                    target.port,
                    ssl=context,
                    server_hostname=target.host if context else None,
                ),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise TimeoutError(
                f"connect to {target.host}:{target.port} timed out after "
                f"{self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise UpstreamError(f"connect to {target.host}:{target.port}: {exc}") from None
        return conn

    def close(self) -> None:
        """Close every idle connection (the app's shutdown)."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _whole_chunks(data: bytes, payloads: list[bytes] | None = None) -> tuple[int, bool]:
    """How many leading bytes of chunked `data` are whole data chunks (their payloads appended
    to `payloads` when given), and whether exactly the terminal chunk (no trailers) follows
    them to the end; -1: malformed or unusual (the state machine, `_dechunk`, says which).

    A read of up to a few dozen chunks is walked chunk by chunk; a longer one (a backend
    that sends faster than the router reads: 100+ events per read at the saturation runs'
    speed) is first checked with C-level calls only (`_split_whole`). With SGLang's chat
    chunks (~260-300 bytes) the walk is the faster of the two up to ~30 chunks (2 chunks:
    0.95 vs 1.6 us, 10: 4.3 vs 4.7-5.2 us) and they meet around 8 KB (30 chunks: 12.4 us
    each); at 128 chunks the split is ~5% faster.
    """
    if len(data) > _SPLIT_ABOVE:
        whole = _split_whole(data, payloads)
        if whole is not None:
            return whole
    return _walk_chunks(data, payloads)


_SPLIT_ABOVE = 8192  # bytes: ~30 SGLang chat chunks, where the walk and the split meet


def _split_whole(data: bytes, payloads: list[bytes] | None) -> tuple[int, bool] | None:
    """`_whole_chunks` for a read of whole chunks whose payloads hold no CRLF (SSE events
    from SGLang): split at CRLF, the sizes read with `map(int, ...)` against the payloads'
    lengths; None for anything else (a partial chunk, a payload with a CRLF, an extension).

    A payload holding a CRLF cannot pass: the first such chunk's size is larger than the
    piece before its CRLF.
    """
    parts = data.split(b"\r\n")
    if len(parts) < 3 or not len(parts) % 2 or parts[-1]:  # not: size, payload, ..., b""
        return None
    sizes, pieces = parts[0:-1:2], parts[1:-1:2]
    try:
        lengths = list(map(int, sizes, repeat(16)))
    except ValueError:
        return None
    if lengths != list(map(len, pieces)) or 0 in lengths[:-1]:
        return None
    ended = not lengths[-1]
    if ended and sizes[-1] != b"0":  # a terminal chunk spelled "00" or " 0": walked
        return None
    if payloads is not None:
        payloads += pieces[:-1] if ended else pieces
    return (len(data) - 5 if ended else len(data)), ended


# A chunk's size line as the servers write it (lower-case hex, no leading zero) -> its size:
# one dict lookup instead of `int(text, 16)` for every chunk of every stream (a stream of 256
# tokens is ~40 chunks). Sizes past the table, other spellings and the terminal "0" go to int().
_HEX_SIZES = {b"%x" % size: size for size in range(1, 4096)}


def _walk_chunks(data: bytes, payloads: list[bytes] | None) -> tuple[int, bool]:
    """`_whole_chunks` chunk by chunk (any read: it stops where the whole chunks stop)."""
    pos, size_of = 0, len(data)
    find, sizes = data.find, _HEX_SIZES
    while pos < size_of:
        end = find(b"\r\n", pos, pos + 18)
        if end < 0:
            return pos, False
        text = data[pos:end]
        size = sizes.get(text)
        if size is None:
            try:
                size = int(text, 16)
            except ValueError:
                return -1, False
            if not size:
                return pos, data[end:] == b"\r\n\r\n"
        stop = end + 2 + size
        if stop + 2 > size_of or data[stop : stop + 2] != b"\r\n":
            return (pos, False) if stop + 2 > size_of else (-1, False)
        if payloads is not None:
            payloads.append(data[end + 2 : stop])
        pos = stop + 2
    return pos, False


# Heads parsed lately: a backend answers with the same head bytes again and again (Date
# changes once a second, Content-Length with a whole answer's size), so a dict lookup replaces
# the parse (0.35 vs 1.9 us a response on this box). Cleared when full, not an LRU.
_HEADS: dict[bytes, tuple[int, dict[str, str], bytes]] = {}
_HEADS_KEPT = 64


def _parsed_head(head: bytes) -> tuple[int, dict[str, str], bytes]:
    """`_parse_head`, remembered; each caller gets its own copy of the headers."""
    known = _HEADS.get(head)
    if known is None:
        known = _parse_head(head)  # a malformed head raises, and is not kept
        if len(_HEADS) >= _HEADS_KEPT:
            _HEADS.clear()
        _HEADS[head] = known
    status, headers, version = known
    return status, dict(headers), version


_WS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips (str.strip() would take \xa0 too)


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status code, headers (lower-case names; repeats joined by ", ") and HTTP version."""
    lines = head.decode("latin-1").split("\r\n")  # decoded once, not per name and value
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"status line {lines[0][:40].encode('latin-1')!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"header line {line[:40].encode('latin-1')!r}")
        key = name.strip(_WS).lower()
        text = value.strip(_WS)
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return status, headers, parts[0].encode("latin-1")
