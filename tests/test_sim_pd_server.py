"""Simulated PD servers over real loopback HTTP: the bootstrap room, timing, failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from backends.sim.pd_server import bootstrap_fields, bootstrap_port_of, start_pd_servers
from backends.sim.protocol import BadRequest
from backends.sim.server import SimServerConfig, SimServerHandle

SPEEDUP = 20.0


@asynccontextmanager
async def pd_pair(
    link_bytes_per_s: float | None = None,
    speedup: float = SPEEDUP,
    context_length: int | None = None,
) -> AsyncIterator[tuple[SimServerHandle, SimServerHandle]]:
    cfg = SimServerConfig(speedup=speedup, context_length=context_length)
    (prefill,) = await start_pd_servers("prefill", 1, config=cfg, link_bytes_per_s=link_bytes_per_s)
    (decode,) = await start_pd_servers("decode", 1, config=cfg)
    try:
        yield prefill, decode
    finally:
        await prefill.close()
        await decode.close()


def _body(prefill: SimServerHandle, room: int, **extra: Any) -> dict[str, Any]:
    return {
        "text": "The sea is wide and the ships are small. " * 40,
        "sampling_params": {"max_new_tokens": 12},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port_of(prefill),
        "bootstrap_room": room,
        **extra,
    }


async def _last_event(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    """The last JSON event of a stream."""
    last = None
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                last = json.loads(line[5:])
    return last


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_a_request_sent_to_both_is_prefilled_once_and_decoded_once() -> None:
    async with pd_pair() as (prefill, decode), aiohttp.ClientSession() as session:
        body = _body(prefill, 123456789012345678)
        (pstatus, pbody), (dstatus, dbody) = await asyncio.gather(
            _post(session, prefill.url + "/generate", body),
            _post(session, decode.url + "/generate", body),
        )
        assert (pstatus, dstatus) == (200, 200)
        assert pbody["meta_info"]["completion_tokens"] == 1  # the prefill server's one token
        assert dbody["meta_info"]["completion_tokens"] == 12
        assert pbody["meta_info"]["prompt_tokens"] == dbody["meta_info"]["prompt_tokens"]


async def test_the_decode_server_streams_after_the_transfer_lands() -> None:
    # 2 MB/s: a ~400-token prompt's 52 MB of KV take ~26 s simulated, ~1.3 s at 20x
    async with pd_pair(link_bytes_per_s=2e6) as (prefill, decode):
        async with aiohttp.ClientSession() as session:
            body = _body(prefill, 7, stream=True)
            started = time.monotonic()
            ptask = asyncio.create_task(_last_event(session, prefill.url + "/generate", body))
            first: float | None = None
            chunks = []
            async with session.post(decode.url + "/generate", json=body) as resp:
                assert resp.status == 200
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("data:") and line != "data: [DONE]":
                        first = first or time.monotonic() - started
                        chunks.append(json.loads(line[5:]))
            pbody = await ptask
        assert pbody["meta_info"]["completion_tokens"] == 1
        n = pbody["meta_info"]["prompt_tokens"]
        transfer = n * 131_072 / 2e6 / SPEEDUP
        assert first is not None and first >= transfer
        assert chunks[-1]["meta_info"]["completion_tokens"] == 12


async def test_a_refused_prefill_leaves_the_room_to_the_next_one() -> None:
    async with pd_pair() as (prefill, decode), aiohttp.ClientSession() as session:
        good = _body(prefill, 99)
        # the prefill server refuses this one (too long), so its room never fills
        bad = dict(good, text="word " * 200_000)
        dtask = asyncio.create_task(_post(session, decode.url + "/generate", good))
        await asyncio.sleep(0.05)
        pstatus, _ = await _post(session, prefill.url + "/generate", bad)
        assert pstatus == 400
        # a refusal is not a prefill: the room waits for one, and a retry of it fills it
        await _post(
            session, prefill.url + "/generate", dict(good, sampling_params={"max_new_tokens": 1})
        )
        dstatus, dbody = await asyncio.wait_for(dtask, 10)
        assert dstatus == 200 and dbody["meta_info"]["completion_tokens"] == 12


async def test_decode_without_bootstrap_is_a_400_and_health_is_ok() -> None:
    async with pd_pair() as (_, decode), aiohttp.ClientSession() as session:
        status, body = await _post(session, decode.url + "/generate", {"text": "hi"})
        assert status == 400 and "bootstrap" in body["error"]["message"]
        status, body = await _post(
            session,
            decode.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 400 and "bootstrap" in json.dumps(body)
        async with session.get(decode.url + "/health_generate") as resp:
            assert resp.status == 200


async def test_a_client_gone_from_the_prefill_fails_the_room() -> None:
    async with (
        pd_pair(speedup=1.0) as (prefill, decode),
        aiohttp.ClientSession() as session,
    ):
        body = _body(prefill, 5, text="x " * 20_000)  # ~0.8 s of prefill in real time
        dtask = asyncio.create_task(_post(session, decode.url + "/generate", body))
        ptask = asyncio.create_task(_post(session, prefill.url + "/generate", body))
        await asyncio.sleep(0.1)
        ptask.cancel()  # the gateway gives up on the prefill before it finishes
        with pytest.raises(asyncio.CancelledError):
            await ptask
        status, dbody = await asyncio.wait_for(dtask, 10)
        assert status == 200
        assert dbody["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.parametrize(
    "body",
    [
        {"bootstrap_room": 1, "bootstrap_host": "", "bootstrap_port": 1},
        {"bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 70000},
        {"bootstrap_room": True, "bootstrap_host": "h", "bootstrap_port": 1},
    ],
)
def test_malformed_bootstrap_fields(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        bootstrap_fields(body)
    assert bootstrap_fields({"text": "x"}) is None


async def test_the_prefill_waits_for_the_decode_sides_handshake() -> None:
    # SGLang's prefill server keeps a request in its bootstrap queue until the decode side
    # has preallocated its KV and handshaken; our bootstrap door's GET is that handshake
    async with pd_pair() as (prefill, _), aiohttp.ClientSession() as session:
        body = _body(prefill, 11)
        ptask = asyncio.create_task(_post(session, prefill.url + "/generate", body))
        await asyncio.sleep(0.3)  # ~6 s simulated: far longer than this prefill
        assert not ptask.done()
        assert prefill.engine.load().running == prefill.engine.load().waiting == 0
        door = f"http://127.0.0.1:{bootstrap_port_of(prefill)}/pd/kv/11"
        async with session.get(door) as resp:
            assert resp.status == 200  # it let the prefill in, then waited for its KV
        status, pbody = await asyncio.wait_for(ptask, 10)
        assert status == 200 and pbody["meta_info"]["completion_tokens"] == 1


async def test_a_full_decode_server_holds_the_prefill_back_until_room_frees() -> None:
    big_context = 1 << 20  # so that one request may ask for most of the KV pool
    async with (
        pd_pair(context_length=big_context) as (prefill, decode),
        aiohttp.ClientSession() as session,
    ):
        capacity = decode.engine.load().kv_capacity_tokens
        # a decodes for hours of simulated time and holds most of the decode pool
        big = _body(prefill, 1, sampling_params={"max_new_tokens": capacity - 50_000}, rid="a")
        a_decode = asyncio.create_task(_post(session, decode.url + "/generate", big))
        a_prefill = asyncio.create_task(_post(session, prefill.url + "/generate", big))
        assert (await asyncio.wait_for(a_prefill, 10))[0] == 200
        # b needs more room than is left: queued for preallocation, no handshake, no prefill
        b = _body(prefill, 2, sampling_params={"max_new_tokens": 60_000}, rid="b")
        b_decode = asyncio.create_task(_post(session, decode.url + "/generate", b))
        b_prefill = asyncio.create_task(_post(session, prefill.url + "/generate", b))
        await asyncio.sleep(0.3)
        assert not b_prefill.done()
        assert prefill.engine.load().running == prefill.engine.load().waiting == 0
        # a ends (aborted): its room goes back, b preallocates, handshakes and is prefilled
        async with session.post(decode.url + "/abort_request", json={"rid": "a"}) as resp:
            assert resp.status == 200
        assert (await asyncio.wait_for(a_decode, 10))[0] == 200
        status, pbody = await asyncio.wait_for(b_prefill, 10)
        assert status == 200 and pbody["meta_info"]["completion_tokens"] == 1
        async with session.post(decode.url + "/abort_request", json={"rid": "b"}) as resp:
            assert resp.status == 200
        await asyncio.wait_for(b_decode, 10)

