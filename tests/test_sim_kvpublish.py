"""KV events from the simulated server over ZMQ, in SGLang's framing and msgpack layout.

The encoding is checked against the layout SGLang 0.5.23 sends (captured batches in
tests/fixtures/sglang_0.5.23/kv_events.json: an array batch of tagged maps); then a real
simulated server with `enable_kv_events` publishes on a loopback
PUB socket while a real SUB socket listens and an HTTP client sends requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import pytest

from backends.sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from backends.sim.kvpublish import (
    KVEventPump,
    KVEventsConfig,
    ZmqKVPublisher,
    encode_batch,
    start_kv_pump,
)
from backends.sim.server import SimServerHandle, page_chain, start_sim_servers

zmq = pytest.importorskip("zmq")
zmq_asyncio = pytest.importorskip("zmq.asyncio")

PAGE = 16


def test_encode_batch_layout() -> None:
    events: list[KVEvent] = [
        BlockStored(block_hashes=(11, 12), parent_block_hash=None, token_counts=(16, 16)),
        BlockStored(block_hashes=(13,), parent_block_hash=12, token_counts=(5,), medium="CPU"),
        BlockRemoved(block_hashes=(12, 13)),
        AllBlocksCleared(),
    ]
    payload = encode_batch(events, ts=1234.5, block_size=16, tokens=None)
    ts, evs, dp_rank = msgpack.unpackb(payload)
    assert ts == 1234.5 and dp_rank == 0
    stored = {"token_ids": [], "block_size": 16, "lora_id": None}
    assert evs == [
        {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None,
         **stored, "medium": "GPU"},
        {"type": "BlockStored", "block_hashes": [13], "parent_block_hash": 12,
         **stored, "medium": "CPU"},
        {"type": "BlockRemoved", "block_hashes": [12, 13], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ]  # fmt: skip


def test_encode_token_lookup() -> None:
    known = {11: [1, 2], 12: [3, 4]}
    ev = BlockStored(block_hashes=(11, 12), parent_block_hash=None, token_counts=(2, 2))
    _, [stored], _ = msgpack.unpackb(encode_batch([ev], ts=0.0, block_size=2, tokens=known.get))
    assert stored["token_ids"] == [1, 2, 3, 4]
    ev = BlockStored(block_hashes=(11, 99), parent_block_hash=None, token_counts=(2, 2))
    _, [stored], _ = msgpack.unpackb(encode_batch([ev], ts=0.0, block_size=2, tokens=known.get))
    assert stored["token_ids"] == [], (
        "a block with unknown ids makes the list empty, never misaligned"
    )


def test_config_from_sglang_json() -> None:
    cfg = KVEventsConfig.from_json(
        '{"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv", "buffer_steps": 5}'
    )
    assert (cfg.publisher, cfg.endpoint, cfg.topic) == ("zmq", "tcp://*:5557", "kv")
    with pytest.raises(ValueError, match="unknown"):
        KVEventsConfig.from_json('{"publisher": "kafka"}')
    with pytest.raises(ValueError, match="keys"):
        KVEventsConfig.from_json('{"endpoit": "tcp://*:1"}')
    with pytest.raises(ValueError, match="replay"):
        KVEventsConfig.from_json('{"replay_endpoint": "tcp://*:5558"}')


class _Source:
    def __init__(self) -> None:
        self.pending: list[KVEvent] = []

    def take_kv_events(self) -> list[KVEvent]:
        out, self.pending = self.pending, []
        return out


async def _subscriber(endpoint: str, topic: bytes = b"") -> Any:
    ctx = zmq_asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    await asyncio.sleep(0.2)  # ZMQ's slow joiner: let the subscription reach the publisher
    return sub


async def _recv(sub: Any) -> tuple[bytes, int, float, list[Any]]:
    topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
    ts, events, _dp_rank = msgpack.unpackb(payload)
    return topic, int.from_bytes(seq, "big"), ts, events


async def test_pump_frames_and_sequence() -> None:
    publisher = ZmqKVPublisher("tcp://127.0.0.1:*", topic="kv")
    assert publisher.endpoint.startswith("tcp://127.0.0.1:")
    source = _Source()
    pump = KVEventPump(source, publisher, block_size=PAGE, clock=lambda: 42.0)
    sub = await _subscriber(publisher.endpoint, b"kv")
    try:
        assert pump.pump() == 0, "no events, no batch"
        source.pending = [BlockRemoved(block_hashes=(1,))]
        assert pump.pump() == 1
        source.pending = [AllBlocksCleared(), BlockRemoved(block_hashes=(2,))]
        assert pump.pump() == 2
        removed = {"type": "BlockRemoved", "medium": "GPU"}
        assert await _recv(sub) == (b"kv", 0, 42.0, [{**removed, "block_hashes": [1]}])
        assert await _recv(sub) == (
            b"kv",
            1,
            42.0,
            [{"type": "AllBlocksCleared"}, {**removed, "block_hashes": [2]}],
        )
        assert pump.events_published == 3
    finally:
        sub.close()
        await pump.stop()
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(b"")


@pytest.fixture
async def kv_server() -> AsyncIterator[SimServerHandle]:
    (handle,) = await start_sim_servers(
        1, speedup=50.0, page_size=PAGE, engine_config={"enable_kv_events": True}
    )
    try:
        yield handle
    finally:
        await handle.close()


async def test_sim_server_publishes_cache_events(kv_server: SimServerHandle) -> None:
    config = KVEventsConfig.from_json('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*"}')
    pump = start_kv_pump(kv_server.engine, config, block_size=PAGE, interval_s=0.005)  # type: ignore[arg-type]
    assert pump is not None
    sub = await _subscriber(pump.publisher.endpoint)
    ids = list(range(1000, 1000 + 5 * PAGE))
    chain = page_chain(ids, PAGE)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}}
            async with http.post(f"{kv_server.url}/generate", json=body) as resp:
                assert resp.status == 200
                meta = (await resp.json())["meta_info"]
                assert meta["cached_tokens"] == 0
            stored: list[int] = []
            first_parent: Any = "unset"
            seqs: list[int] = []
            while len(stored) < len(chain) - 1:
                _, seq, ts, events = await _recv(sub)
                seqs.append(seq)
                assert ts > 1e9, "wall-clock seconds, as SGLang's time.time()"
                for ev in events:
                    if ev["type"] == "BlockStored" and ev["medium"] == "GPU":
                        if first_parent == "unset":
                            first_parent = ev["parent_block_hash"]
                        stored += ev["block_hashes"]
                        assert ev["block_size"] == PAGE
            assert first_parent is None, "the first stored block starts the prompt"
            assert stored[: len(chain) - 1] == list(chain[: len(chain) - 1])
            assert seqs == list(range(len(seqs)))

            async with http.post(f"{kv_server.url}/flush_cache") as resp:
                assert resp.status == 200
            seen: list[str] = []
            while "AllBlocksCleared" not in seen:
                _, _, _, events = await _recv(sub)
                seen += [ev["type"] for ev in events]
    finally:
        sub.close()
        await pump.stop()
