"""The router's SGLang wire code and the simulated server, against what SGLang 0.5.23 sent.

tests/fixtures/sglang_0.5.23/ holds a real server's answers, recorded by `make e2e`
(`e2e/run.py --capture`, tiny CPU model, page size 16), with the model's tokenizer.json.
`backends/sglang.py` must read every one of them; `backends/sglang_kv.py` must decode the
real KV event batches, and the router's blocks for a captured prompt must be the pages those
events name. The simulated server must answer in the same shapes: every key it sends is one
the real server sends (same JSON type), and every key the router reads is there.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backends.sglang import (
    cached_tokens_from_meta,
    cached_tokens_from_openai,
    parse_load,
    parse_server_info,
    usage_from_sse_chunk,
)
from backends.sglang_kv import SequenceTracker, decode_batch
from backends.sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored
from backends.sim.kvpublish import encode_batch
from router.core.blocks import BlockHasher
from router.core.chat_template import load_chat_template
from router.core.index import PrefixIndex
from router.core.kv_mirror import EventMirror, KVCleared, KVRemoved, KVStored
from router.core.prompt import parse_chat, parse_generate
from router.core.tokens import HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "sglang_0.5.23"
PAGE = 16


@cache
def fixture(name: str) -> list[dict[str, Any]]:
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    assert doc["sglang_version"] == "0.5.23"
    entries: list[dict[str, Any]] = doc[name]
    return entries


def sse_events(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data:") and block != "data: [DONE]":
            out.append(json.loads(block[5:]))
    return out


# -- backends/sglang.py reads the real answers -------------------------------------------------


def test_server_info_is_read() -> None:
    for entry in fixture("server_info"):  # /server_info and /get_server_info say the same
        info = parse_server_info(entry["body"])
        assert info.model == ".e2e/model" and info.version == "0.5.23"
        assert info.page_size == PAGE and info.max_total_num_tokens == 20000
        assert info.tp_size == 1
        assert info.context_length is None, "null unless --context-length is given"
        assert info.hierarchical_cache is False
        kv = info.kv_events
        assert kv is not None and kv.topic == "kv" and kv.block_size == PAGE and kv.dp_size == 1
        port = entry["body"]["kv_events"]["endpoint_port_base"]
        assert kv.endpoints("http://127.0.0.1:1") == [f"tcp://127.0.0.1:{port}"]


def test_loads_are_read() -> None:
    idle, full, get_load = fixture("loads_idle")
    assert get_load["status"] == 404, "SGLang 0.5.23 has no /get_load"
    assert idle["body"] == full["body"] | {"timestamp": idle["body"]["timestamp"]}
    load = parse_load(idle["body"])
    assert load is not None and (load.running, load.waiting, load.used_tokens) == (0, 0, 0)
    assert load.max_total_num_tokens == 20000
    busy = parse_load(fixture("loads_busy")[0]["body"])
    assert busy is not None and busy.running == 1 and busy.used_tokens == 512
    assert busy.cache_hit_rate == pytest.approx(0.9897)


def test_generate_and_openai_counts_are_read() -> None:
    first, repeat = fixture("generate")
    assert cached_tokens_from_meta(first["body"]) == 0
    assert first["body"]["meta_info"]["cached_tokens_details"] is None  # null when nothing hit
    meta = repeat["body"]["meta_info"]
    assert cached_tokens_from_meta(repeat["body"]) == meta["cached_tokens"] > 0
    assert meta["cached_tokens"] % PAGE == 0 and meta["cached_tokens_details"]["host"] == 0
    chat_first, chat_repeat = fixture("chat")
    assert cached_tokens_from_openai(chat_first["body"]) == 0
    assert cached_tokens_from_openai(chat_repeat["body"]) == 112
    assert cached_tokens_from_openai(fixture("completions")[0]["body"]) is not None


@pytest.mark.parametrize("name", ["generate_stream", "chat_stream", "completions_stream"])
def test_stream_usage_is_read(name: str) -> None:
    events = sse_events(fixture(name)[0]["text"])
    usages = [u for u in map(usage_from_sse_chunk, events) if u is not None]
    assert usages and usages[-1].prompt_tokens and usages[-1].completion_tokens == 8
    assert usages[-1].cached_tokens is not None
    if name == "generate_stream":  # cumulative meta_info on every chunk, from the first
        assert len(usages) == len(events) and usages[0].cached_tokens == usages[-1].cached_tokens
        assert usages[-1].finished and not usages[0].finished
    else:  # OpenAI streams: the finish chunk, then one usage chunk with no choices
        assert events[-1]["choices"] == [] and "usage" in events[-1]


def test_abort_flush_and_errors_as_sent() -> None:
    (abort,) = fixture("abort_request")
    assert abort["status"] == 200 and abort["text"] == "", "200 with an empty body"
    tail = fixture("aborted_stream")[0]["text"]  # the stream's last 2000 characters
    assert tail.endswith("data: [DONE]\n\n")
    assert '"finish_reason":{"type":"abort","message":"Aborted"' in tail
    (flush,) = fixture("flush_cache")
    assert flush["status"] == 200 and flush["text"].startswith("Cache flushed.")
    chat_err, gen_err = fixture("errors")
    assert chat_err["status"] == 400 and chat_err["body"]["object"] == "error"
    assert gen_err["status"] == 400 and set(gen_err["body"]) == {"error"}


# -- KV events ---------------------------------------------------------------------------------


def kv_batches() -> list[tuple[int, bytes]]:
    return [(f["seq"], base64.b64decode(f["payload_b64"])) for f in fixture("kv_events")]


def test_kv_event_batches_decode() -> None:
    frames = fixture("kv_events")
    assert {f["topic"] for f in frames} == {"kv"}
    tracker = SequenceTracker()
    verdicts = [tracker.check(seq) for seq, _ in kv_batches()]
    assert frames[0]["seq"] > 0, "a subscriber that connects late misses the first batches"
    assert verdicts == ["first"] + ["ok"] * (len(frames) - 1)
    kinds = []
    for seq, payload in kv_batches():
        batch = decode_batch(seq, payload)
        assert batch.dp_rank == 0 and batch.ts > 1e9
        for ev in batch.events:
            kinds.append(type(ev))
            if isinstance(ev, KVStored):
                assert ev.block_size == PAGE and ev.medium == "GPU"
                assert len(ev.token_ids) == PAGE * len(ev.block_hashes)
    assert KVStored in kinds and kinds[-1] is KVCleared  # /flush_cache ends the capture


def test_router_blocks_are_the_pages_the_events_name() -> None:
    """The captured /generate prompt, hashed by the router with the model's tokenizer at the
    page size, matches exactly the pages the server's first BlockStored reported."""
    hasher = BlockHasher(HFTokenizer(str(FIXTURES / "tokenizer.json")), block_tokens=PAGE)
    index = PrefixIndex()
    index.add_backend("b", 20000, PAGE)
    mirror = EventMirror(index, "b", seeds=[hasher.text_seed("")], block_tokens=PAGE)
    mirror.start()
    first_seq, first_payload = kv_batches()[0]
    for ev in decode_batch(first_seq, first_payload).events:
        mirror.apply(ev, 0.0)
    body = fixture("generate")[0]["request"]
    req = hasher.route_request(parse_generate(body), "r1")
    prompt_tokens = fixture("generate")[0]["body"]["meta_info"]["prompt_tokens"]
    assert req.prompt_tokens == prompt_tokens, "the router counts the engine's tokens"
    full = prompt_tokens // PAGE
    assert index.match(req.blocks) == {"b": full}
    assert mirror.orphan_pages == 0 and mirror.skipped_pages == 0
    # the rest of the capture: later batches chain on pages seen; the flush clears all
    for seq, payload in kv_batches()[1:]:
        for ev in decode_batch(seq, payload).events:
            mirror.apply(ev, 0.0)
    assert mirror.orphan_pages == 0
    assert index.held_blocks("b") == 0 and index.match(req.blocks) == {}


def test_chat_rendered_by_the_models_template_is_the_engines_pages() -> None:
    """A captured chat request, rendered by the model's own chat template and tokenized, is
    the token sequence of the pages the server stored for it (and its count the server's)."""
    template = load_chat_template(str(FIXTURES / "tokenizer.json"))
    assert template is not None
    tokenizer = HFTokenizer(str(FIXTURES / "tokenizer.json"))
    hasher = BlockHasher(tokenizer, block_tokens=PAGE, chat_template=template)
    entry = fixture("chat")[0]
    prompt = parse_chat(entry["request"])
    req = hasher.route_request(prompt, "c1")
    assert req.prompt_tokens == entry["body"]["usage"]["prompt_tokens"]
    assert hasher.templated == 1
    index = PrefixIndex()
    index.add_backend("b", 20000, PAGE)
    mirror = EventMirror(index, "b", seeds=[hasher.text_seed(prompt.salt)], block_tokens=PAGE)
    mirror.start()
    for seq, payload in kv_batches():
        for ev in decode_batch(seq, payload).events:
            if not isinstance(ev, KVCleared):
                mirror.apply(ev, 0.0)
    assert index.match(req.blocks) == {"b": req.prompt_tokens // PAGE}
    # without the template the router's chat blocks are its own segments: no page matches
    plain = BlockHasher(tokenizer, block_tokens=PAGE).route_request(prompt, "c2")
    assert index.match(plain.blocks) == {}


def test_sim_publisher_sends_the_real_layout() -> None:
    """Field names, order and types of the simulated publisher's batches are SGLang's."""
    real_stored = next(
        e for _s, p in kv_batches() for e in decode_raw(p)[1] if e["type"] == "BlockStored"
    )
    ours = decode_raw(
        encode_batch(
            [
                BlockStored(block_hashes=(1,), parent_block_hash=None, token_counts=(PAGE,)),
                BlockRemoved(block_hashes=(1,)),
                AllBlocksCleared(),
            ],
            ts=1.0,
            block_size=PAGE,
            tokens=lambda h: list(range(PAGE)),
        )
    )
    assert len(ours) == 3 and ours[2] == 0  # [ts, events, dp_rank]
    stored, removed, cleared = ours[1]
    assert list(stored) == list(real_stored)
    assert all(type(stored[k]) is type(real_stored[k]) for k in stored if k != "parent_block_hash")
    assert list(removed) == ["type", "block_hashes", "medium"] and cleared == {
        "type": "AllBlocksCleared"
    }
    decoded = decode_batch(0, encode_batch([BlockRemoved(block_hashes=(5,))], ts=1.0, block_size=1))
    assert decoded.events == (KVRemoved(block_hashes=(5,), medium="GPU"),)


def decode_raw(payload: bytes) -> list[Any]:
    import msgpack

    body: list[Any] = msgpack.unpackb(payload, raw=False)
    return body


# -- the simulated server answers in the real shapes ---------------------------------------------


def assert_shape_within(sim: Any, real: Any, path: str = "$") -> None:
    """Every key the simulator sends, the real server sends too, with the same JSON type."""
    if isinstance(sim, dict):
        assert isinstance(real, dict), f"{path}: sim sends an object, real sends {real!r:.60}"
        extra = set(sim) - set(real)
        assert not extra, f"{path}: keys the real server does not send: {sorted(extra)}"
        for key in sim:
            assert_shape_within(sim[key], real[key], f"{path}.{key}")
    elif isinstance(sim, list):
        assert isinstance(real, list), f"{path}: sim sends a list"
        if sim and real:
            assert_shape_within(sim[0], real[0], f"{path}[0]")
    elif sim is not None and real is not None:
        kinds = (bool, int | float, str)
        assert any(isinstance(sim, k) and isinstance(real, k) for k in kinds), (
            f"{path}: sim {sim!r:.40} vs real {real!r:.40}"
        )


async def test_sim_server_answers_in_the_real_shapes(sim_servers: Any) -> None:
    (sim,) = await sim_servers(1, model=".e2e/model", page_size=PAGE)
    url = sim.url
    async with aiohttp.ClientSession() as http:

        async def call(entry: dict[str, Any]) -> Any:
            body = entry["request"]  # the very request the real server answered
            async with http.post(f"{url}/{entry['path']}", json=body) as resp:
                assert resp.status == entry["status"], entry["path"]
                if body.get("stream"):
                    return sse_events(await resp.text())
                return await resp.json()

        for name in ("generate", "chat", "completions"):
            real = fixture(name)[-1]
            assert_shape_within(await call(real), real["body"], name)
        for name in ("generate_stream", "chat_stream", "completions_stream"):
            real = fixture(name)[0]
            sim_events = await call(real)
            real_events = sse_events(real["text"])
            assert_shape_within(sim_events[0], real_events[0], f"{name}[first]")
            assert_shape_within(sim_events[-1], real_events[-1], f"{name}[last]")
    # what the router reads is present in both (checked on the real side above)
    assert parse_server_info(fixture("server_info")[0]["body"]).kv_events is not None
