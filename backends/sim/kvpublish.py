"""KV cache events of a simulated server, published over ZMQ in SGLang's wire format.

SGLang (`srt/disaggregation/kv_events.py`, enabled by `--kv-events-config '{"publisher":
"zmq", "endpoint": "tcp://*:5557"}'`) sends each batch of cache events as a three-frame ZMQ
PUB message::

    [topic (utf-8, default "")] [seq (8 bytes, big-endian, from 0)] [payload (msgpack)]

The payload, as SGLang 0.5.23 sends it (tests/fixtures/sglang_0.5.23/kv_events.json), is
msgspec's `array_like` `KVEventBatch(ts, events, attn_dp_rank)`, and each event a tagged
map (msgspec `tag=True`, `omit_defaults=True`: optional fields left unset are absent)::

    [ts, [{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": h | nil,
           "token_ids": [...], "block_size": n, "lora_id": nil, "medium": "GPU"},
          {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"},
          {"type": "AllBlocksCleared"}], 0]

Older SGLang sent each event as a tagged array; `backends.sglang_kv` reads both. The
simulated engine names blocks by its chained cache-unit ids (`kvevents.py`), which is what
`block_hashes` carries here.

What differs from SGLang: the engine records token counts, not token ids, so `token_ids` is
empty unless the caller passes a `tokens` lookup (block hash -> that block's ids). Consumers
that key on `block_hashes` lose nothing; consumers that map token ids (the router's
`EventMirror`, Dynamo) need the lookup. The HiCache tier is "CPU" here, "CPU_PINNED" in
SGLang. The replay socket (`replay_endpoint`) is not implemented.

Pieces: `encode_batch` (pure), `ZmqKVPublisher` (one PUB socket, sequence numbers),
`KVEventPump` (drains an engine's `take_kv_events()` every `interval_s` on the event loop and
publishes non-empty batches) and `KVEventsConfig.from_json` (SGLang's `--kv-events-config`).
pyzmq is an optional dependency (`pip install prefix-router[kv-events]`), imported only when a
publisher is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from backends.sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = [
    "KVEventPump",
    "KVEventSource",
    "KVEventsConfig",
    "TokenLookup",
    "ZmqKVPublisher",
    "encode_batch",
    "encode_event",
    "start_kv_pump",
]

TokenLookup = Callable[[int], Sequence[int] | None]


class KVEventSource(Protocol):
    """Anything that hands out its KV events once (`backends.sim.engine.Engine` does)."""

    def take_kv_events(self) -> list[KVEvent]: ...


def encode_event(
    event: KVEvent, *, block_size: int, tokens: TokenLookup | None = None
) -> dict[str, Any]:
    """One event as SGLang's tagged map (see the module docstring)."""
    if isinstance(event, BlockStored):
        token_ids: list[int] = []
        if tokens is not None:
            for h in event.block_hashes:
                ids = tokens(h)
                if ids is None:  # one unknown block: send none rather than a misaligned list
                    token_ids = []
                    break
                token_ids.extend(ids)
        return {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": token_ids,
            "block_size": block_size,
            "lora_id": None,
            "medium": event.medium,
        }
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": list(event.block_hashes),
            "medium": event.medium,
        }
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {event!r}")


def encode_batch(
    events: Sequence[KVEvent],
    *,
    ts: float,
    block_size: int,
    tokens: TokenLookup | None = None,
) -> bytes:
    """The msgpack payload of one `KVEventBatch` (data-parallel rank 0, as one SGLang rank)."""
    body = [ts, [encode_event(e, block_size=block_size, tokens=tokens) for e in events], 0]
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return payload


@dataclass(frozen=True, slots=True, kw_only=True)
class KVEventsConfig:
    """SGLang's `KVEventsConfig`, the JSON of `--kv-events-config`, minus what we lack."""

    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    topic: str = ""
    hwm: int = 100_000

    def __post_init__(self) -> None:
        if self.publisher not in ("zmq", "null"):
            raise ValueError(f"unknown KV event publisher {self.publisher!r} (zmq or null)")
        if self.hwm < 0:
            raise ValueError("hwm must be >= 0")

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse `--kv-events-config`; SGLang's buffer options are accepted and ignored."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        if data.get("replay_endpoint"):
            raise ValueError("replay_endpoint is not supported by the simulated server")
        ignored = {"replay_endpoint", "buffer_steps", "max_queue_size"}
        known = {"publisher", "endpoint", "topic", "hwm"}
        unknown = set(data) - known - ignored
        if unknown:
            raise ValueError(f"unknown --kv-events-config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in data.items() if k in known})


class ZmqKVPublisher:
    """One ZMQ PUB socket sending KV event batches with SGLang's framing and sequence numbers.

    Like SGLang: an endpoint with `*`, `::`, `ipc://` or `inproc://` is bound, any other is
    connected to. PUB never blocks: past `hwm` queued messages per subscriber, ZMQ drops.
    """

    def __init__(self, endpoint: str = "tcp://*:5557", *, topic: str = "", hwm: int = 100_000):
        try:
            import zmq
        except ImportError as exc:  # optional dependency
            raise RuntimeError(
                "KV events need pyzmq: pip install 'prefix-router[kv-events]'"
            ) from exc
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if any(s in endpoint for s in ("*", "::")) or endpoint.startswith(("ipc://", "inproc://")):
            self._sock.bind(endpoint)
        else:
            self._sock.connect(endpoint)
        last = self._sock.getsockopt(zmq.LAST_ENDPOINT)
        self.endpoint: str = last.decode() if isinstance(last, bytes) and last else endpoint
        self._topic = topic.encode("utf-8")
        self._seq = 0
        self._closed = False

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, payload: bytes) -> int:
        """Send one encoded batch; returns its sequence number."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        seq = self._seq
        self._sock.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._seq += 1
        return seq

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()


class KVEventPump:
    """Drains an engine's KV events on the event loop and publishes them in batches.

    The engine runs on the same loop (the sim server's driver), so draining needs no lock;
    a batch holds whatever the engine recorded since the last drain, in order.
    """

    def __init__(
        self,
        source: KVEventSource,
        publisher: ZmqKVPublisher,
        *,
        block_size: int,
        interval_s: float = 0.01,
        tokens: TokenLookup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.source = source
        self.publisher = publisher
        self.block_size = block_size
        self.interval_s = interval_s
        self.tokens = tokens
        self.clock = clock
        self.events_published = 0
        self._task: asyncio.Task[None] | None = None

    def pump(self) -> int:
        """Drain once; publish one batch if anything happened. Returns the events sent."""
        events = self.source.take_kv_events()
        if not events:
            return 0
        payload = encode_batch(
            events, ts=self.clock(), block_size=self.block_size, tokens=self.tokens
        )
        self.publisher.publish(payload)
        self.events_published += len(events)
        return len(events)

    def start(self) -> None:
        """Pump every `interval_s` on the running loop until `stop()`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.pump()
            await asyncio.sleep(self.interval_s)

    async def stop(self, *, close_publisher: bool = True) -> None:
        """Stop the loop after one last drain, so nothing recorded is left unsent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.pump()
        if close_publisher:
            self.publisher.close()


def start_kv_pump(
    source: KVEventSource, config: KVEventsConfig, *, block_size: int, interval_s: float = 0.01
) -> KVEventPump | None:
    """Publisher + pump for `source` as `config` says, started on the running loop.

    None for the "null" publisher. The engine must record events
    (`EngineConfig(enable_kv_events=True)`, e.g. `start_sim_servers(engine_config=...)`).
    """
    if config.publisher == "null":
        return None
    publisher = ZmqKVPublisher(config.endpoint, topic=config.topic, hwm=config.hwm)
    pump = KVEventPump(source, publisher, block_size=block_size, interval_s=interval_s)
    pump.start()
    return pump
