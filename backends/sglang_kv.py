"""SGLang's KV event stream: ZMQ subscription, sequence tracking, msgpack decoding.

Wire format, as SGLang 0.5.23 sends it (captured in tests/fixtures/sglang_0.5.23/kv_events.json)::

    frames:  [topic (utf-8)] [seq (8 bytes, big-endian)] [payload (msgpack)]
    payload: [ts, [event, ...], attn_dp_rank]
    event:   {"type": "BlockStored", "block_hashes": [int64...], "parent_block_hash": int64|nil,
              "token_ids": [...], "block_size": n, "lora_id": nil, "medium": "GPU"}
             {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"}
             {"type": "AllBlocksCleared"}

Optional fields left unset are omitted from the maps (msgspec `omit_defaults`). Older SGLang
sent each event as a tagged array (`["BlockStored", hashes, parent, token_ids, size, lora,
medium]`); `decode_batch` reads both. What reaches the router's core is
`router.core.kv_mirror`'s plain events.

`SequenceTracker` says whether a batch follows the last one (`ok`), skipped some (`gap`: a
subscriber that connected late, or ZMQ dropped past its high-water mark) or went back
(`restart`: the publisher is a new process, so its cache started empty).

`KVEventSubscriber` runs one SUB socket per endpoint on the event loop (pyzmq's asyncio
sockets; pyzmq is the `kv-events` extra, imported only when a subscriber starts) and hands
each decoded batch, with the tracker's verdict, to a callback. It also watches the socket's
connection (a ZMQ monitor): when the publisher's TCP connection drops (the server died or
restarted), `on_disconnect` is called and the tracker starts over, since whatever comes next
may be a new process whose cache started empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from router.core.kv_mirror import KVCleared, KVEvent, KVRemoved, KVStored

__all__ = [
    "KVBatch",
    "KVEventSubscriber",
    "SequenceTracker",
    "decode_batch",
    "decode_event",
]

log = logging.getLogger(__name__)

Verdict = Literal["first", "ok", "gap", "restart"]


@dataclass(frozen=True, slots=True)
class KVBatch:
    seq: int
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of ints")
    if not all(type(v) is int for v in value):
        raise ValueError("expected a list of ints")
    return tuple(value)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def decode_event(raw: Any) -> KVEvent | None:
    """One event (a tagged map, or a tagged array from older SGLang); None if unknown."""
    if isinstance(raw, Mapping):
        kind = raw.get("type")
        fields: Mapping[str, Any] = raw
    elif isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = {
            "BlockStored": (
                "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"
            ),
            "BlockRemoved": ("block_hashes", "medium"),
            "AllBlocksCleared": (),
        }.get(kind, ())  # fmt: skip
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise ValueError("an event is a map or a tagged array")
    if kind == "BlockStored":
        parent = fields.get("parent_block_hash")
        if parent is not None and type(parent) is not int:
            raise ValueError("parent_block_hash must be an int or nil")
        size = fields.get("block_size")
        if type(size) is not int or size <= 0:
            raise ValueError("block_size must be a positive int")
        return KVStored(
            block_hashes=_ints(fields.get("block_hashes")),
            parent_block_hash=parent,
            token_ids=_ints(fields.get("token_ids", [])),
            block_size=size,
            medium=_opt_str(fields.get("medium")),
        )
    if kind == "BlockRemoved":
        return KVRemoved(
            block_hashes=_ints(fields.get("block_hashes")), medium=_opt_str(fields.get("medium"))
        )
    if kind == "AllBlocksCleared":
        return KVCleared()
    return None  # an event type this router does not know: skip it, keep the rest


def decode_batch(seq: int, payload: bytes) -> KVBatch:
    """A payload's events (unknown event types skipped); ValueError if malformed."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"not msgpack: {exc}") from exc
    if not isinstance(body, list) or len(body) < 2 or not isinstance(body[1], list):
        raise ValueError("a batch is [ts, [events], dp_rank]")
    ts = body[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValueError("batch ts must be a number")
    dp = body[2] if len(body) > 2 and type(body[2]) is int else None
    events = tuple(e for e in map(decode_event, body[1]) if e is not None)
    return KVBatch(seq=seq, ts=float(ts), events=events, dp_rank=dp)


class SequenceTracker:
    """Sequence numbers of one publisher: consecutive, skipped, or started over."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.gaps = 0
        self.restarts = 0
        self.missed = 0  # batches skipped over, summed

    def check(self, seq: int) -> Verdict:
        expected = self.expected
        self.expected = seq + 1
        if expected is None:
            return "first"
        if seq == expected:
            return "ok"
        if seq > expected:
            self.gaps += 1
            self.missed += seq - expected
            return "gap"
        self.restarts += 1
        return "restart"


BatchHandler = Callable[[KVBatch, Verdict], None]
DisconnectHandler = Callable[[], None]


class KVEventSubscriber:
    """SUB sockets on a backend's KV event endpoints, feeding `on_batch` on the event loop."""

    def __init__(
        self,
        endpoints: Sequence[str],
        topic: str,
        on_batch: BatchHandler,
        on_disconnect: DisconnectHandler | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no endpoints")
        self.endpoints = list(endpoints)
        self.topic = topic
        self.on_batch = on_batch
        self.on_disconnect = on_disconnect
        self.trackers = [SequenceTracker() for _ in self.endpoints]
        self.batches = 0
        self.bad_batches = 0
        self.disconnects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: Any = None

    def start(self) -> None:
        try:
            import zmq
            import zmq.asyncio
        except ImportError as exc:  # optional dependency
            raise RuntimeError(
                "KV events need pyzmq: pip install 'prefix-router[kv-events]'"
            ) from exc
        self._ctx = zmq.asyncio.Context()
        loop = asyncio.get_running_loop()
        for i, endpoint in enumerate(self.endpoints):
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode("utf-8"))
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(endpoint)
            self._tasks.append(loop.create_task(self._run(i, sock), name=f"kv-events {endpoint}"))
            self._tasks.append(loop.create_task(self._watch(i, sock, monitor)))

    async def _run(self, i: int, sock: Any) -> None:
        tracker = self.trackers[i]
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.bad_batches += 1
                    continue
                seq = int.from_bytes(frames[1], "big")
                try:
                    batch = decode_batch(seq, frames[2])
                except ValueError as exc:
                    self.bad_batches += 1
                    log.warning("kv events %s: bad batch %d: %s", self.endpoints[i], seq, exc)
                    continue
                self.batches += 1
                try:
                    self.on_batch(batch, tracker.check(seq))
                except Exception:  # a bug in applying one batch must not end the subscription
                    log.exception("kv events %s: applying batch %d failed", self.endpoints[i], seq)
        finally:
            sock.close(0)

    async def _watch(self, i: int, sock: Any, monitor: Any) -> None:
        """The publisher's connection dropped: numbering starts over with whoever comes next."""
        try:
            while True:
                await monitor.recv_multipart()  # only EVENT_DISCONNECTED is subscribed
                self.disconnects += 1
                self.trackers[i].expected = None
                if self.on_disconnect is not None:
                    try:
                        self.on_disconnect()
                    except Exception:
                        log.exception("kv events %s: disconnect handler failed", self.endpoints[i])
        finally:
            with contextlib.suppress(Exception):
                sock.disable_monitor()
            monitor.close(0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._ctx is not None:
            # closes the sockets of tasks cancelled before they ever ran, then terminates
            self._ctx.destroy(linger=0)
            self._ctx = None
