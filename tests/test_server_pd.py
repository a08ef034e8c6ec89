"""`serve` in PD mode over real HTTP: simulated prefill and decode servers, the openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from server_fixtures import router_for

from backends.sim.pd_server import bootstrap_port_of, start_pd_servers
from backends.sim.server import SimServerConfig, SimServerHandle
from router.server.app import RunningServer
from router.server.pd import PDProxy, parse_prefill, with_bootstrap

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LONG = "You are a careful assistant who answers questions about the sea and its ships. " * 40


@asynccontextmanager
async def pd_pool(
    prefills: int = 2, decodes: int = 2, context_length: int | None = None, **router: Any
) -> AsyncIterator[tuple[list[SimServerHandle], list[SimServerHandle], RunningServer]]:
    cfg = SimServerConfig(speedup=20.0, context_length=context_length)
    pre = await start_pd_servers("prefill", prefills, config=cfg)
    dec = await start_pd_servers("decode", decodes, config=cfg)
    try:
        specs = [f"{h.url} {bootstrap_port_of(h)}" for h in pre]
        async with router_for(
            [], prefill=specs, decode=[h.url for h in dec], policy=None, **router
        ) as server:
            yield pre, dec, server
    finally:
        for h in pre + dec:
            await h.close()


def _proxy(server: RunningServer) -> PDProxy:
    proxy = server.state.proxy
    assert isinstance(proxy, PDProxy)
    return proxy


async def test_openai_sdk_chat_and_completions_through_a_pd_pool() -> None:
    async with pd_pool() as (_, _, server):
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=7
        )
        assert resp.choices[0].message.content
        assert resp.usage is not None and resp.usage.completion_tokens == 7
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=9, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces)
        comp = await client.completions.create(model=MODEL, prompt=LONG, max_tokens=5)
        assert comp.usage is not None and comp.usage.completion_tokens == 5
        # every request ended on both sides; the prefill side saw the repeated prompt cached
        pd = _proxy(server).pd
        for core in (pd.prefill, pd.decode):
            stats = core.stats()
            assert stats["in_flight"] == 0
            assert sum(b["routed"] for b in stats["backends"].values()) == 3
            assert sum(b["finished"] for b in stats["backends"].values()) == 3
        reported = sum(b["reported_cached_tokens"] for b in pd.prefill.stats()["backends"].values())
        assert reported > 0


async def test_generate_streams_from_the_decode_server() -> None:
    async with pd_pool() as (pre, dec, server), aiohttp.ClientSession() as session:
        body = {"text": LONG, "sampling_params": {"max_new_tokens": 6}, "stream": True}
        async with session.post(server.url + "/generate", json=body) as resp:
            assert resp.status == 200
            backend = resp.headers["X-Prefix-Router-Backend"]
            events = [
                json.loads(line[5:])
                async for raw in resp.content
                if (line := raw.decode().strip()).startswith("data:") and "[DONE]" not in line
            ]
        assert backend in {h.url for h in dec}
        assert events[-1]["meta_info"]["completion_tokens"] == 6
        body["stream"] = False
        async with session.post(server.url + "/generate", json=body) as resp:
            out = await resp.json()
        assert out["meta_info"]["completion_tokens"] == 6
        # the second prompt hit the prefill server that holds it: its cached tokens reported
        assert out["meta_info"]["cached_tokens"] == 0  # the decode server's own
        pd = _proxy(server).pd
        backends = pd.prefill.stats()["backends"]
        assert sum(b["reported_cached_tokens"] for b in backends.values()) > 0
        assert max(b["routed"] for b in backends.values()) == 2  # both on the cached one
        del pre


async def test_stats_and_readiness_cover_both_pools() -> None:
    async with pd_pool() as (pre, dec, server), aiohttp.ClientSession() as session:
        body = {"text": LONG, "sampling_params": {"max_new_tokens": 4}}
        for _ in range(2):
            async with session.post(server.url + "/generate", json=body) as resp:
                assert resp.status == 200
        async with session.get(server.url + "/stats") as resp:
            stats = await resp.json()
        prefill_rows = {b["url"]: b for b in stats["backends"]}
        assert set(prefill_rows) == {h.url for h in pre}
        # the prefill side's counts are its own core's (the proxy's metrics follow the decode)
        assert sorted(b["routed"] for b in prefill_rows.values()) == [0, 2]
        assert sum(b["reported_cached_tokens"] for b in prefill_rows.values()) > 0
        decode = stats["decode"]
        assert decode["policy"] == "pd_decode"
        decode_rows = {b["url"]: b for b in decode["backends"]}
        assert set(decode_rows) == {h.url for h in dec}
        assert sum(b["routed"] for b in decode_rows.values()) == 2
        assert all(b["healthy"] and b["learned"]["decode_step_s"] > 0 for b in decode_rows.values())
        assert decode["core"]["in_flight"] == 0
        assert stats["pd"] == {
            "mode": "pair",
            "room_hold": True,
            "held_for_decode_room": 0,
            "tpot_slo_s": None,
        }
        async with session.get(server.url + "/readiness") as resp:
            assert resp.status == 200
            ready = await resp.json()
        assert ready["healthy_backends"] == 2 and ready["healthy_decode_backends"] == 2
        async with session.get(server.url + "/metrics") as resp:
            text = await resp.text()
        gauges = [line for line in text.splitlines() if "backend_healthy{" in line]
        assert all(any(h.url in line for line in gauges) for h in pre + dec)
        for h in dec:  # no decode server left: nothing can be served
            await h.close()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with session.get(server.url + "/readiness") as resp:
                ready = await resp.json()
                if resp.status == 503:
                    break
            assert asyncio.get_running_loop().time() < deadline, ready
            await asyncio.sleep(0.1)
        assert ready == {"status": "not ready", "healthy_backends": 2, "healthy_decode_backends": 0}


async def test_a_dead_prefill_server_is_retried_before_the_first_byte() -> None:
    async with pd_pool() as (pre, _, server), aiohttp.ClientSession() as session:
        pd = _proxy(server).pd
        first = pd.prefill.backends()[0].id  # equal prices: the first offered wins
        victim = next(h for h in pre if h.url == first)
        await victim.close()  # it stops listening; the router still believes it healthy
        for i in range(4):
            body = {"text": f"{i} {LONG}", "sampling_params": {"max_new_tokens": 3}}
            async with session.post(server.url + "/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["meta_info"]["completion_tokens"] == 3
        assert server.state.metrics.retries.get() >= 1
        assert server.state.pool.entries[first].last_error is not None
        for core in (pd.prefill, pd.decode):
            assert core.stats()["in_flight"] == 0
        # the failed attempt's decode server was not blamed
        assert all(e.last_error is None for e in pd_decode_pool(server).entries.values())


async def test_a_dead_decode_server_is_retried_and_blamed() -> None:
    async with pd_pool() as (_, dec, server), aiohttp.ClientSession() as session:
        pd = _proxy(server).pd
        first = pd.decode.backends()[0].id
        await next(h for h in dec if h.url == first).close()
        body = {"text": LONG, "sampling_params": {"max_new_tokens": 3}, "stream": True}
        async with session.post(server.url + "/generate", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["X-Prefix-Router-Backend"] != first
            assert b"[DONE]" in await resp.read()
        assert pd_decode_pool(server).entries[first].last_error is not None
        assert all(e.last_error is None for e in server.state.pool.entries.values())
        for core in (pd.prefill, pd.decode):
            assert core.stats()["in_flight"] == 0


def pd_decode_pool(server: RunningServer) -> Any:
    return _proxy(server).setup.pool()


async def test_a_prefill_refusal_comes_back_to_the_client() -> None:
    async with pd_pool() as (_, _, server), aiohttp.ClientSession() as session:
        body = {"text": "word " * 200_000, "sampling_params": {"max_new_tokens": 3}}
        async with session.post(server.url + "/generate", json=body) as resp:
            assert resp.status == 400
        pd = _proxy(server).pd
        await asyncio.sleep(0.1)
        assert pd.prefill.stats()["in_flight"] == 0 and pd.decode.stats()["in_flight"] == 0


async def test_independent_side_policies() -> None:
    async with pd_pool(prefill_policy="cache_aware", decode_policy="power_of_two") as (
        _,
        _,
        server,
    ):
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert resp.usage is not None and resp.usage.completion_tokens == 4
        assert server.state.policy_name == "pd:cache_aware+power_of_two"


def test_bootstrap_fields_are_spliced_or_replaced() -> None:
    out = json.loads(with_bootstrap(b'{"text": "hi"}', "h", 8998, 5))
    assert out == {"text": "hi", "bootstrap_host": "h", "bootstrap_port": 8998, "bootstrap_room": 5}
    out = json.loads(with_bootstrap(b'{"bootstrap_room": 1, "x": 2}', "h", 1, 7))
    assert out["bootstrap_room"] == 7 and out["x"] == 2
    assert json.loads(with_bootstrap(b"{}", "h", 1, 2))["bootstrap_port"] == 1
    assert parse_prefill("http://p:30000 9000", 8998) == ("http://p:30000", 9000)
    assert parse_prefill("p:30000", 8998)[1] == 8998
    with pytest.raises(ValueError):
        parse_prefill("http://p:1 x", 1)


def test_pd_mode_refuses_more_than_one_worker() -> None:
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--prefill", "http://127.0.0.1:9",
         "--decode", "http://127.0.0.1:10", "--workers", "2"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "PD mode" in proc.stderr and "Traceback" not in proc.stderr


async def _first_chunk(resp: aiohttp.ClientResponse) -> bytes:
    async for raw in resp.content:
        if raw.startswith(b"data:"):
            return raw
    raise AssertionError("the stream ended without an event")


async def _fill_then_hold(
    server: RunningServer, session: aiohttp.ClientSession, capacity: int
) -> tuple[aiohttp.ClientResponse, asyncio.Task[aiohttp.ClientResponse]]:
    """Send a (streaming) request that fills most of a decode server's KV pool, then one
    that does not fit beside it; return the first's open response once the second is held.

    The router's books count each request's expected output, E[min(N, max_tokens)] over the
    outputs it has seen finish: it is shown long ones (decoding them for real would take
    minutes here), so a request's expectation is its cap."""
    outputs = _proxy(server).pd.decode.policy.outputs  # type: ignore[attr-defined]
    for _ in range(16):
        outputs.observe(capacity)
    big = {"text": LONG, "stream": True, "sampling_params": {"max_new_tokens": capacity - 50_000}}
    small = {"text": LONG, "stream": True, "sampling_params": {"max_new_tokens": 60_000}}
    return await _send_then_hold(server, session, big, small)


async def _send_then_hold(
    server: RunningServer, session: aiohttp.ClientSession, first: Any, second: Any
) -> tuple[aiohttp.ClientResponse, asyncio.Task[aiohttp.ClientResponse]]:
    """Stream `first` to its first event, then send `second` and wait until it is held."""
    a = await session.post(server.url + "/generate", json=first)
    assert a.status == 200
    await _first_chunk(a)
    b_task = asyncio.create_task(session.post(server.url + "/generate", json=second))
    for _ in range(50):
        if _proxy(server).pd.held:
            break
        await asyncio.sleep(0.02)
    assert _proxy(server).pd.held == 1
    return a, b_task


async def test_a_request_waits_in_the_router_for_decode_room() -> None:
    # one decode server: a fills most of its KV pool, b does not fit beside it, so the router
    # holds b (the decode server never sees it) until a ends
    async with (
        pd_pool(prefills=1, decodes=1, context_length=1 << 20) as (_, dec, server),
        aiohttp.ClientSession() as session,
    ):
        proxy = _proxy(server)
        a, b_task = await _fill_then_hold(server, session, dec[0].engine.load().kv_capacity_tokens)
        assert dec[0].engine.load().running == 1  # b never reached the decode server
        async with session.get(server.url + "/metrics") as resp:
            assert "prefix_router_pd_held 1.0" in await resp.text()
        a.close()  # the client leaves: the router aborts a and frees its room
        b = await asyncio.wait_for(b_task, 10)
        assert b.status == 200
        await asyncio.wait_for(_first_chunk(b), 10)
        assert proxy.pd.held == 0
        b.close()
        async with session.get(server.url + "/metrics") as resp:
            text = await resp.text()
        assert "prefix_router_pd_room_wait_seconds_count 1.0" in text


async def test_no_pd_room_hold_sends_at_once() -> None:
    async with (
        pd_pool(prefills=1, decodes=1, context_length=1 << 20, pd_room_hold=False) as (
            _,
            dec,
            server,
        ),
        aiohttp.ClientSession() as session,
    ):
        capacity = dec[0].engine.load().kv_capacity_tokens
        big = {
            "text": LONG,
            "stream": True,
            "sampling_params": {"max_new_tokens": capacity - 50_000},
        }
        a = await session.post(server.url + "/generate", json=big)
        await _first_chunk(a)
        small = {"text": LONG, "stream": True, "sampling_params": {"max_new_tokens": 60_000}}
        b_task = asyncio.create_task(session.post(server.url + "/generate", json=small))
        await asyncio.sleep(0.3)
        assert _proxy(server).pd.held == 0  # sent on: it waits in the decode server's queue
        a.close()
        b = await asyncio.wait_for(b_task, 10)
        await asyncio.wait_for(_first_chunk(b), 10)
        b.close()


async def test_a_held_request_goes_to_a_decode_server_that_comes_back() -> None:
    # two decode servers, one drained: a fills the other, b is held; when the drained one is
    # undrained (as when a server recovers) b goes there without waiting for a to end
    async with (
        pd_pool(prefills=1, decodes=2, context_length=1 << 20) as (_, dec, server),
        aiohttp.ClientSession() as session,
    ):
        decode_pool = pd_decode_pool(server)
        spare = dec[1].url
        assert decode_pool.drain(spare, True)
        a, b_task = await _fill_then_hold(server, session, dec[0].engine.load().kv_capacity_tokens)
        assert a.headers["X-Prefix-Router-Backend"] == dec[0].url
        assert decode_pool.drain(spare, False)
        b = await asyncio.wait_for(b_task, 10)
        assert b.status == 200 and b.headers["X-Prefix-Router-Backend"] == spare
        await asyncio.wait_for(_first_chunk(b), 10)
        assert dec[0].engine.load().running == 1  # a still decoding: b did not wait for it
        a.close()
        b.close()


async def test_slo_tpot_holds_a_request_that_would_slow_the_batch_past_it() -> None:
    # an SLO just above the profile's empty-batch step (6.64 ms): any second request would pass
    # it beside the first, so it waits in the router though the decode server has KV room
    async with (
        pd_pool(prefills=1, decodes=1, slo_tpot_s=0.0067) as (_, dec, server),
        aiohttp.ClientSession() as session,
    ):
        body = {"text": LONG, "stream": True, "sampling_params": {"max_new_tokens": 2000}}
        a, b_task = await _send_then_hold(server, session, body, body)
        assert dec[0].engine.load().running == 1
        async with session.get(server.url + "/stats") as resp:
            pd_stats = (await resp.json())["pd"]
        assert pd_stats["tpot_slo_s"] == 0.0067 and pd_stats["held_for_decode_room"] == 1
        a.close()
        b = await asyncio.wait_for(b_task, 10)
        assert b.status == 200
        await asyncio.wait_for(_first_chunk(b), 10)
        b.close()


def test_slo_tpot_is_refused_outside_the_pair_price() -> None:
    from router.server.config import ServerConfig

    with pytest.raises(ValueError, match="--slo-tpot applies to PD mode"):
        ServerConfig(backends=["http://127.0.0.1:1"], slo_tpot_s=0.03)
    with pytest.raises(ValueError, match="--slo-tpot applies to PD mode"):
        ServerConfig(
            prefill=["http://127.0.0.1:1"],
            decode=["http://127.0.0.1:2"],
            decode_policy="power_of_two",
            slo_tpot_s=0.03,
        )
    ServerConfig(prefill=["http://127.0.0.1:1"], decode=["http://127.0.0.1:2"], slo_tpot_s=0.03)
