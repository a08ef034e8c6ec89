"""Shared state between the worker processes of one router, through a hub on a Unix socket.

`serve --workers N` runs N router processes on one port (router/server/workers.py). They must
route as one router: each tells the others what it routed, exactly as replicas do through
Redis (`events.py`), but without asking the user for a Redis server. The supervisor process
runs a `HubServer` on a Unix-domain socket in its private runtime folder; each worker's
`HubState` connects to it and is an ordinary `SharedState` transport for `StateSync`.

Wire: length-prefixed frames, ``[u32 big-endian length][kind byte][payload]``:

    H  hello     worker -> hub   payload: the worker's replica id (sent once, first)
    E  event     worker -> hub   payload: one msgpack event (`events.encode`)
                 hub -> others   the same frame bytes, unchanged (the hub never decodes)
    M  members   hub -> workers  payload: the connected replica ids, comma-separated

The hub forwards each event frame to every *other* connected worker, in order, without
decoding it: whatever whole frames one read brings are passed on in one write per worker. A
worker that reads too slowly (more than `max_buffer` bytes queued at the hub for it) loses
frames rather than stalling the others; the loss is counted. Membership replaces heartbeats:
a worker is alive while its connection is open, so `heartbeat` does nothing and `replicas` is
the last member list the hub sent. When the hub goes away (supervisor gone) every call raises
`StateUnavailable`, as for a Redis outage, and `StateSync` backs off and reconnects.

The URL is ``hub+unix:///path/to/hub.sock`` (`open_state`); only the supervisor hands it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from router.state.events import Event, EventError, IncompatibleReplicaError, decode, encode
from router.state.protocol import Endpoint, StateUnavailable

__all__ = ["HUB_SCHEME", "HubServer", "HubState", "hub_path"]

log = logging.getLogger(__name__)

HUB_SCHEME = "hub+unix://"
_HEAD = struct.Struct(">IB")
_HELLO, _EVENT, _MEMBERS = ord("H"), ord("E"), ord("M")
_MAX_FRAME = 16 * 1024 * 1024
_READ_SIZE = 1 << 16


def hub_path(url: str) -> str:
    """The socket path of a ``hub+unix:///path`` URL."""
    if not url.startswith(HUB_SCHEME) or len(url) == len(HUB_SCHEME):
        raise ValueError(f"a hub URL is {HUB_SCHEME}/path/to/socket, got {url!r}")
    return url[len(HUB_SCHEME) :]


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload) + 1, kind) + payload


def _complete(buf: bytearray) -> int:
    """Length of the run of whole frames at the start of `buf` (ValueError: not frames)."""
    pos, size = 0, len(buf)
    while size - pos >= _HEAD.size:
        length, _kind = _HEAD.unpack_from(buf, pos)
        if not 1 <= length <= _MAX_FRAME:
            raise ValueError(f"bad frame length {length}")
        if pos + 4 + length > size:
            break
        pos += 4 + length
    return pos


def _frames(view: memoryview) -> list[tuple[int, bytes]]:
    """(kind, payload) of each whole frame in `view` (checked by `_complete`)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(view):
        length, kind = _HEAD.unpack_from(view, pos)
        out.append((kind, bytes(view[pos + _HEAD.size : pos + 4 + length])))
        pos += 4 + length
    return out


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(_HEAD.size)
    length, kind = _HEAD.unpack(head)
    if not 1 <= length <= _MAX_FRAME:
        raise ValueError(f"bad frame length {length}")
    return kind, await reader.readexactly(length - 1)


class HubServer:
    """The supervisor's end: relays event frames between the connected workers."""

    def __init__(self, path: str | Path, *, max_buffer: int = 64 * 1024 * 1024) -> None:
        self.path = str(path)
        self.max_buffer = max_buffer
        self._members: dict[asyncio.StreamWriter, str] = {}
        self._server: asyncio.Server | None = None
        self.forwarded = 0
        self.dropped = 0

    @property
    def url(self) -> str:
        return HUB_SCHEME + self.path

    @property
    def members(self) -> list[str]:
        return sorted(self._members.values())

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._members):
            writer.close()
        self._members.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()

    def _announce(self) -> None:
        frame = _frame(_MEMBERS, ",".join(self.members).encode())
        for writer in self._members:
            if not writer.is_closing():
                writer.write(frame)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind, payload = await _read_frame(reader)
            if kind != _HELLO:
                return
            self._members[writer] = payload.decode(errors="replace")
            self._announce()
            buf = bytearray()
            while data := await reader.read(_READ_SIZE):
                buf += data
                cut = _complete(buf)  # forward whole frames only, many in one write
                if not cut:
                    continue
                blob = bytes(buf[:cut])
                del buf[:cut]
                for other in self._members:
                    if other is writer or other.is_closing():
                        continue
                    if other.transport.get_write_buffer_size() > self.max_buffer:
                        self.dropped += 1  # a stalled worker must not stall the rest
                        continue
                    other.write(blob)
                    self.forwarded += 1
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            if self._members.pop(writer, None) is not None:
                self._announce()
            writer.close()


class HubState(Endpoint):
    """A worker's end of the supervisor's hub (module docstring)."""

    def __init__(self, url: str, *, replica: str | None = None, cluster: str = "default") -> None:
        super().__init__(replica=replica, cluster=cluster)
        self.path = hub_path(url)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._inbox: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._members: tuple[str, ...] = ()
        self._malformed = 0
        self._closed = False

    @property
    def malformed(self) -> int:
        return self._malformed

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connect_lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            if self._closed:
                raise StateUnavailable("hub state closed")
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
                writer.write(_frame(_HELLO, self._replica.encode()))
                await writer.drain()
            except OSError as err:
                raise StateUnavailable(f"hub unreachable at {self.path}: {err!r}") from err
            self._writer = writer
            self._reader_task = asyncio.create_task(self._receive(reader), name="hub-reader")
            return writer

    def _lost(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._wake.set()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        try:
            while data := await reader.read(_READ_SIZE):
                buf += data
                cut = _complete(buf)
                for kind, payload in _frames(memoryview(buf)[:cut]):
                    self._take(kind, payload)
                del buf[:cut]
        except (ConnectionError, ValueError):
            pass
        finally:
            self._lost()

    def _take(self, kind: int, payload: bytes) -> None:
        if kind == _MEMBERS:
            self._members = tuple(n for n in payload.decode().split(",") if n)
            return
        if kind != _EVENT:
            return
        try:
            event = decode(payload)
        except IncompatibleReplicaError as err:
            self._malformed += 1
            log.error("refusing a worker's state event: %s", err)
            return
        except EventError:
            self._malformed += 1
            return
        if event.replica != self._replica:
            self._inbox.append(event)
            self._wake.set()

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        writer = await self._connect()
        try:
            writer.write(b"".join(_frame(_EVENT, encode(e)) for e in events))
            await writer.drain()
        except (OSError, RuntimeError) as err:
            self._lost()
            raise StateUnavailable(f"hub publish failed: {err!r}") from err

    async def read(self, timeout_s: float) -> Sequence[Event]:
        await self._connect()
        if not self._inbox:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
        if not self._inbox and self._writer is None:
            raise StateUnavailable("hub connection lost")
        out = list(self._inbox)
        self._inbox.clear()
        return out

    async def heartbeat(self, ttl_s: float) -> None:
        await self._connect()  # alive while connected: the hub's member list is the heartbeat

    async def replicas(self) -> Sequence[str]:
        return self._members or (self._replica,)

    async def close(self) -> None:
        self._closed = True
        task, self._reader_task = self._reader_task, None
        self._lost()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
