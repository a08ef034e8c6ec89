"""KV events driving the prefix index: the mirror (core), the decoder and the subscriptions.

The subscription test runs a real ZMQ PUB socket on loopback sending batches in SGLang
0.5.23's layout (the simulated publisher's `encode_batch`, checked against captured batches
in test_sglang_wire.py) to the router's `KVEventsManager`, as `serve` wires it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import msgpack
import pytest

from backends.sglang import KVEventsInfo, ServerInfo
from backends.sglang_kv import SequenceTracker, decode_batch, decode_event
from router.core.blocks import BlockHasher, chain_hashes
from router.core.index import PrefixIndex
from router.core.kv_mirror import EventMirror, KVCleared, KVRemoved, KVStored
from router.core.model import BackendSpec
from router.core.policies import make_policy
from router.core.prompt import parse_generate
from router.core.routing import RoutingCore
from router.core.tokens import TiktokenTokenizer

PAGE = 4
SEED = 99
FIXTURES = Path(__file__).parent / "fixtures" / "sglang_0.5.23"


def stored(hashes: list[int], parent: int | None, tokens: list[int], **kw: object) -> KVStored:
    return KVStored(
        block_hashes=tuple(hashes),
        parent_block_hash=parent,
        token_ids=tuple(tokens),
        block_size=kw.pop("block_size", PAGE),  # type: ignore[arg-type]
        medium=kw.pop("medium", "GPU"),  # type: ignore[arg-type]
    )


def mirror_with_index() -> tuple[PrefixIndex, EventMirror]:
    index = PrefixIndex()
    index.add_backend("b", 1000, PAGE)
    mirror = EventMirror(index, "b", seeds=[SEED], block_tokens=PAGE)
    mirror.start()
    return index, mirror


def test_stored_pages_match_the_routers_own_chain() -> None:
    index, mirror = mirror_with_index()
    tokens = list(range(12))
    mirror.apply(stored([101, 102], None, tokens[:8]), 0.0)
    mirror.apply(stored([103], 102, tokens[8:]), 0.0)  # a child chains on its parent's page
    ours = chain_hashes([*tokens, 50, 51], PAGE, SEED)  # a request with a partial tail
    assert index.match(ours) == {"b": 3}
    mirror.apply(KVRemoved(block_hashes=(103,)), 0.0)
    assert index.match(ours) == {"b": 2}
    mirror.apply(KVCleared(), 0.0)
    assert index.match(ours) == {} and index.held_blocks("b") == 0
    assert (mirror.stored_pages, mirror.removed_pages) == (3, 1)


def test_what_cannot_be_placed_is_counted_not_guessed() -> None:
    index, mirror = mirror_with_index()
    mirror.apply(stored([7], 555, [1, 2, 3, 4]), 0.0)  # parent never seen (joined late)
    mirror.apply(stored([8], None, [1, 2, 3, 4, 5, 6, 7, 8], block_size=8), 0.0)
    mirror.apply(stored([9], None, [1, 2, 3, 4], medium="CPU_PINNED"), 0.0)
    mirror.apply(stored([10], None, [1, 2, 3]), 0.0)  # token ids do not fill the page
    assert index.held_blocks("b") == 0
    assert (mirror.orphan_pages, mirror.skipped_pages) == (1, 3)


def test_event_driven_backend_ignores_routing_beliefs() -> None:
    index, _mirror = mirror_with_index()
    chain = chain_hashes(list(range(8)), PAGE, SEED)
    index.insert("b", chain, 0.0, PAGE, prompt_tokens=8)
    index.observe_cached("b", chain, 8, 0.0, PAGE, prompt_tokens=8)
    assert index.held_blocks("b") == 0 and index.touch("b", chain, 0.0) == 0
    index.set_event_driven("b", False)  # back to the model: it learns from routing again
    index.insert("b", chain, 0.0, PAGE, prompt_tokens=8)
    assert index.match(chain) == {"b": 2}
    index.set_event_driven("b", True)  # switching drops what the other source believed
    assert index.held_blocks("b") == 0 and index.event_backends == {"b"}


def test_event_driven_backend_is_not_fitted_to_capacity() -> None:
    index = PrefixIndex()
    index.add_backend("b", PAGE * 2, PAGE)
    mirror = EventMirror(index, "b", seeds=[1, 2], block_tokens=PAGE)  # two salts: two entries
    mirror.start()
    mirror.apply(stored([1, 2], None, list(range(8))), 0.0)
    assert index.held_blocks("b") == 4  # the engine's evictions arrive as BlockRemoved


def test_sequence_tracker() -> None:
    t = SequenceTracker()
    assert [t.check(s) for s in (5, 6, 9, 10, 0, 1)] == [
        "first", "ok", "gap", "ok", "restart", "ok",
    ]  # fmt: skip
    assert (t.gaps, t.missed, t.restarts) == (1, 2, 1)


def test_decoder_reads_maps_and_older_tagged_arrays() -> None:
    as_map = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
              "token_ids": [5, 6], "block_size": 2, "lora_id": None, "medium": "GPU"}  # fmt: skip
    as_array = ["BlockStored", [1], None, [5, 6], 2, None, "GPU"]
    assert (
        decode_event(as_map)
        == decode_event(as_array)
        == KVStored(
            block_hashes=(1,), parent_block_hash=None, token_ids=(5, 6), block_size=2, medium="GPU"
        )
    )
    assert decode_event({"type": "SomethingNew", "x": 1}) is None
    assert decode_event(["AllBlocksCleared"]) == KVCleared()
    for bad in ({"type": "BlockStored", "block_hashes": "x", "block_size": 2}, 5):
        with pytest.raises(ValueError):
            decode_event(bad)
    with pytest.raises(ValueError):
        decode_batch(0, b"\xc1")
    with pytest.raises(ValueError):
        decode_batch(0, msgpack.packb({"not": "a batch"}))


def _publisher_and_info() -> tuple[object, ServerInfo]:
    from backends.sim.kvpublish import ZmqKVPublisher

    pub = ZmqKVPublisher("tcp://127.0.0.1:*", topic="kv")
    port = int(pub.endpoint.rsplit(":", 1)[1])
    info = ServerInfo(
        model="m",
        page_size=PAGE,
        kv_events=KVEventsInfo(host="127.0.0.1", port_base=port, topic="kv", block_size=PAGE),
    )
    return pub, info


async def test_manager_follows_a_publisher_through_gaps_and_restarts() -> None:
    pytest.importorskip("zmq")
    from backends.sim.kvpublish import ZmqKVPublisher
    from router.core.tokens import HFTokenizer
    from router.server.kv_events import KVEventsManager

    policy = make_policy("cost", rng=random.Random(0))
    core = RoutingCore(policy, [])
    core.add_backend(BackendSpec(id="b", kv_capacity_tokens=1000, page_size=PAGE))
    hasher = BlockHasher(TiktokenTokenizer(), block_tokens=PAGE)
    manager = KVEventsManager(policy, hasher, "auto")
    pub, info = _publisher_and_info()
    assert isinstance(pub, ZmqKVPublisher)
    # tiktoken cannot give the engine's tokens: the backend stays modelled, and says why
    manager.discovered("b", "http://127.0.0.1:1", info)
    assert "tokenizer" in manager.stats()["backends"]["b"]["reason"]
    # the model's own tokenizer, as --tokenizer gives (the captured tiny model's)
    hasher.tokenizer = HFTokenizer(str(FIXTURES / "tokenizer.json"))
    manager.discovered("b", "http://127.0.0.1:1", info)
    index = policy.index  # type: ignore[attr-defined]
    prompt = parse_generate({"input_ids": list(range(12))})
    blocks = hasher.route_request(prompt, "r").blocks

    def batch(*events: dict[str, object]) -> bytes:
        return msgpack.packb([1.0, list(events), 0])

    def page_event(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, object]:
        return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                "token_ids": tokens, "block_size": PAGE, "medium": "GPU"}  # fmt: skip

    async def until(check: object, what: str) -> None:
        for _ in range(200):
            if check():  # type: ignore[operator]
                return
            await asyncio.sleep(0.01)
        raise AssertionError(what)

    try:
        stats = lambda: manager.stats()["backends"]["b"]  # noqa: E731
        for _ in range(100):  # a SUB socket joins a moment after connect: resend until heard
            pub.publish(batch(page_event([11, 12], None, list(range(8)))))
            await asyncio.sleep(0.02)
            if stats().get("batches"):
                break
        await until(lambda: index.match(blocks).get("b") == 2, "events drive the index")
        assert stats()["source"] == "events"
        # a lost batch: back to the modelled cache (empty), events ignored until a flush
        pub._seq += 3
        pub.publish(batch(page_event([13], 12, list(range(8, 12)))))
        await until(lambda: stats()["source"] == "modelled", "a gap falls back")
        assert index.match(blocks) == {}
        pub.publish(batch({"type": "AllBlocksCleared"}, page_event([21], None, [0, 1, 2, 3])))
        await until(lambda: stats()["source"] == "events", "a flush makes events exact again")
        assert index.match(blocks) == {"b": 1}
        # a restarted publisher (numbers start over): its cache started empty
        pub._seq = 0
        pub.publish(batch(page_event([31], None, [100, 101, 102, 103])))
        await until(lambda: stats()["restarts"] == 1, "a restart is seen")
        assert index.match(blocks) == {} and stats()["gaps"] == 1  # the old page is forgotten
        pub.publish(batch(page_event([32, 33], None, list(range(8)))))
        await until(lambda: index.match(blocks).get("b") == 2, "events flow after a restart")
        # routing beliefs do not touch an event-driven backend
        decision = core.route(hasher.route_request(prompt, "r2"), 0.0)
        assert decision.predicted_cached_tokens == 8  # two whole pages of 11 tokens' n-1
        # the publisher goes away (a server killed): what it held is forgotten at once
        pub.close()
        await until(lambda: stats()["disconnects"] >= 1, "a dropped connection is seen")
        assert index.match(blocks) == {} and stats()["source"] == "events"
    finally:
        await manager.stop()
        pub.close()


async def test_a_publisher_given_by_hand_is_followed() -> None:
    pytest.importorskip("zmq")
    from pydantic import ValidationError

    from router.core.tokens import HFTokenizer
    from router.server.config import load_config
    from router.server.kv_events import KVEventsManager

    config = load_config(
        backends=["http://127.0.0.1:1"],
        kv_event_endpoints=["http://127.0.0.1:1/=tcp://127.0.0.1:5557"],
    )
    assert config.kv_event_endpoints == {"http://127.0.0.1:1": "tcp://127.0.0.1:5557"}
    with pytest.raises(ValidationError):
        load_config(backends=["http://h:1"], kv_event_endpoints=["http://h:1=h:5557"])
    policy = make_policy("cost", rng=random.Random(0))
    core = RoutingCore(policy, [])
    core.add_backend(BackendSpec(id="http://127.0.0.1:1", page_size=PAGE))
    hasher = BlockHasher(HFTokenizer(str(FIXTURES / "tokenizer.json")), block_tokens=PAGE)
    manager = KVEventsManager(policy, hasher, "auto", config.kv_event_endpoints)
    try:  # the server says nothing of a publisher: the endpoint given by hand is used
        manager.discovered("http://127.0.0.1:1", "http://127.0.0.1:1", ServerInfo(model="m",
                           page_size=PAGE))  # fmt: skip
        row = manager.stats()["backends"]["http://127.0.0.1:1"]
        assert row["source"] == "events" and row["endpoints"] == ["tcp://127.0.0.1:5557"]
    finally:
        await manager.stop()


def test_expected_chain_matches_until_its_request_ends() -> None:
    index, mirror = mirror_with_index()
    chain = chain_hashes(list(range(8)), PAGE, SEED)
    index.expect("b", chain)  # routed there; its prefill has not reported yet
    index.expect("b", chain[:1])  # a second request on the same first page
    assert index.match(chain) == {"b": 2} and index.held_blocks("b") == 0
    mirror.apply(stored([1], None, list(range(4))), 0.0)  # the engine cached page 0
    mirror.apply(KVRemoved(block_hashes=(1,)), 0.0)  # and evicted it: still being computed
    assert index.match(chain) == {"b": 2}
    index.settle("b", chain)
    assert index.match(chain) == {"b": 1}  # the second request still expects page 0
    index.settle("b", chain[:1])
    assert index.match(chain) == {}
    index.expect("b", chain)
    mirror.apply(KVCleared(), 0.0)  # a flush forgets what was expected too
    assert index.match(chain) == {}
    index.settle("b", chain)  # settling after a flush is harmless
    plain = PrefixIndex()
    plain.add_backend("m", 1000, PAGE)
    plain.expect("m", chain)  # a modelled backend learns from insert, not expect
    assert plain.match(chain) == {}


def test_simulated_tiers_count_a_block_held_in_either() -> None:
    from backends.sim.kvevents import BlockRemoved, BlockStored
    from router.replay.simulate import apply_kv_events

    index = PrefixIndex()
    index.add_backend("b", 10_000, 512)
    index.set_event_driven("b", True)
    tiers: dict[int, int] = {}
    gpu = BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_counts=(512, 512))
    apply_kv_events(index, "b", [gpu], 0.0, tiers)
    offload = [
        BlockStored(block_hashes=(2,), parent_block_hash=1, token_counts=(512,), medium="CPU"),
        BlockRemoved(block_hashes=(2,)),  # moved to the host pool: still loads back
    ]
    apply_kv_events(index, "b", offload, 0.0, tiers)
    assert index.match([1, 2]) == {"b": 2}
    apply_kv_events(index, "b", [BlockRemoved(block_hashes=(2,), medium="CPU")], 0.0, tiers)
    assert index.match([1, 2]) == {"b": 1} and tiers == {1: 1}
