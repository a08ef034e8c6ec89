"""Failures on either side: a client that leaves mid-stream, a backend that dies mid-run."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from server_fixtures import Setup, free_port, router_for, serving, sims

from backends.sim.server import start_sim_servers
from router.server.app import RunningServer

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def _aborted(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    found = re.search(r"^sglang:num_aborted_requests_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _backend_running(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/get_load") as r:
        data: Any = await r.json()
    rows = data if isinstance(data, list) else [data]
    return sum(int(row.get("num_reqs", 0)) for row in rows)


def _long_chat(stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000,
        "stream": stream,
    }


async def test_client_disconnect_aborts_backend_within_1s_and_frees_load() -> None:
    async with serving(1, speedup=1.0) as env:
        backend = env.handles[0].url
        before = await _aborted(env.session, backend)
        client = aiohttp.ClientSession()
        resp = await client.post(env.url + "/v1/chat/completions", json=_long_chat())
        assert resp.status == 200
        chunks = 0
        async for line in resp.content:
            if line.startswith(b"data:"):
                chunks += 1
                if chunks == 3:
                    break
        assert env.router.state.core.backends()[0].load == 1
        resp.close()
        await client.close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            if await _aborted(env.session, backend) > before:
                break
            await asyncio.sleep(0.02)
        assert await _aborted(env.session, backend) > before, "backend saw no abort within 1 s"
        assert time.monotonic() - t0 < 1.0
        assert await _backend_running(env.session, backend) == 0
        for _ in range(50):
            if env.router.state.core.backends()[0].load == 0:
                break
            await asyncio.sleep(0.02)
        assert env.router.state.core.backends()[0].load == 0
        metrics = await (await env.session.get(env.url + "/metrics")).text()
        assert 'prefix_router_errors_total{kind="client_disconnect"} 1' in metrics


async def _spawn_sim(port: int) -> asyncio.subprocess.Process:
    """A simulated backend in its own process (`prefix-router sim`), so it can be SIGKILLed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "sim",
        "--port",
        str(port),
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("simulated backend did not start")


async def _stream(
    session: aiohttp.ClientSession, url: str, started: asyncio.Event
) -> tuple[str, list[Any]]:
    events: list[Any] = []
    async with session.post(url + "/v1/chat/completions", json=_long_chat()) as resp:
        assert resp.status == 200
        backend = resp.headers["X-Prefix-Router-Backend"]
        async for line in resp.content:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
                started.set()
    return backend, events


async def _chat(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[int, str]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status, r.headers.get("X-Prefix-Router-Backend", "")


async def _healthy(env: Setup, url: str) -> bool:
    async with env.session.get(env.url + "/stats") as r:
        stats = await r.json()
    return bool({b["url"]: b for b in stats["backends"]}[url]["healthy"])


async def _wait_loads(
    router: RunningServer, done: Callable[[dict[str, int]], bool], timeout: float = 10.0
) -> dict[str, int]:
    """Poll the router's per-backend loads until `done(loads)` or `timeout` (then the last)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = {b.id: b.load for b in router.state.core.backends()}
        if done(loads) or time.monotonic() > deadline:
            return loads
        await asyncio.sleep(0.02)


async def test_backend_killed_mid_run_retries_errors_and_recovers() -> None:
    port = free_port()
    dead_url = f"http://127.0.0.1:{port}"
    proc = await _spawn_sim(port)  # real time: its requests are still running when it dies
    try:
        async with (
            sims(1) as live,
            router_for([dead_url, live[0].url], health_timeout_s=2.0) as router,
            aiohttp.ClientSession() as session,
        ):
            env = Setup(handles=live, router=router, session=session)
            started = [asyncio.Event(), asyncio.Event()]
            streams = [asyncio.create_task(_stream(session, env.url, ev)) for ev in started]
            for ev in started:
                await asyncio.wait_for(ev.wait(), 10)
            # round robin: one non-streaming request per backend, still waiting for headers
            # (4000 tokens in real time on the doomed backend: far from done when it dies)
            pending = [asyncio.create_task(_chat(session, env.url, 4000)) for _ in range(2)]
            loads = await _wait_loads(router, lambda loads: loads[dead_url] == 2)
            assert loads[dead_url] == 2  # a stream and a request waiting for its headers
            proc.kill()  # SIGKILL: connections drop, nothing is sent
            await proc.wait()
            # the request that was not yet streaming is retried on the live backend
            results = await asyncio.wait_for(asyncio.gather(*pending), 20)
            assert results == [(200, live[0].url), (200, live[0].url)]
            # the stream on the dead backend ends with an error event; the other one completes
            ended = dict(await asyncio.wait_for(asyncio.gather(*streams), 20))
            assert set(ended) == {dead_url, live[0].url}
            assert "[DONE]" not in ended[dead_url] and ended[dead_url][-1]["error"]["message"]
            assert ended[live[0].url][-1] == "[DONE]"
            assert not await _healthy(env, dead_url)
            metrics = await (await session.get(env.url + "/metrics")).text()
            assert "prefix_router_retries_total 1" in metrics
            assert 'prefix_router_errors_total{kind="stream_broken"} 1' in metrics
            # the backend returns on the same port: the health loop brings it back
            back = (await start_sim_servers(1, base_port=port, speedup=20.0))[0]
            try:
                for _ in range(100):
                    if await _healthy(env, dead_url):
                        break
                    await asyncio.sleep(0.05)
                assert await _healthy(env, dead_url)
                seen = {(await _chat(session, env.url, 2))[1] for _ in range(4)}
                assert seen == {dead_url, live[0].url}
            finally:
                await back.close()
            loads = await _wait_loads(router, lambda loads: not any(loads.values()))
            assert not any(loads.values()), loads
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
