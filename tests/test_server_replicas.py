"""Two live routers sharing routing state through a real redis-server.

Two simulated SGLang backends X and Y and two router apps A and B (in-process `start_server`,
cost policy, `state=redis://...`, one cluster), all real servers on 127.0.0.1; redis-server is
a child process on a free port with persistence off (`RedisServer` from test_state_redis),
and the Redis tests are skipped with a reason when the binary is missing.

A lists its backends in the other order, so for an idle pool A's tie-break picks the backend
B's would not: a chat with a long system prompt goes through A to X; once A's events reached
B, the next turn of that conversation through B goes to X as well, with the prefix predicted
(B's /stats) and reported cached (the backend's usage). A third router with the default
memory state, never told, predicts nothing for the same turn. Then Redis is killed: both
routers go on answering, and their /stats say the shared state is disconnected.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_fixtures import router_for, sims
from test_state_redis import REDIS, RedisServer

from router.commands import serve as serve_command
from router.replay.ports import free_port
from router.server.app import RunningServer
from router.server.config import load_config

needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server not installed (apt-get install -y redis-server)"
)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# ~4k tokens of varied text: 60+ blocks of 64 tokens, far more than any chance overlap
SYSTEM = "You are the support assistant of the Acme parts catalogue. " + " ".join(
    f"Part {i:04d} is a {('bolt', 'gear', 'valve', 'spring', 'bearing')[i % 5]} rated "
    f"{i * 7 % 900} newtons, stocked in aisle {i % 37} bin {i * 13 % 101}."
    for i in range(220)
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _messages(turns: int) -> list[dict[str, str]]:
    """The conversation up to user turn `turns` (1-based), with fixed assistant replies."""
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in range(1, turns + 1):
        if turn > 1:
            messages.append({"role": "assistant", "content": f"Answer {turn - 1}: aisle 3."})
        messages.append({"role": "user", "content": f"Question {turn}: where is part {turn}?"})
    return messages


async def _chat(
    session: aiohttp.ClientSession, router: RunningServer, turns: int
) -> tuple[str, dict[str, Any]]:
    """One non-streaming chat turn: (the backend the router chose, the response body)."""
    body = {"model": MODEL, "messages": _messages(turns), "max_tokens": 8}
    async with session.post(router.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Prefix-Router-Backend"], await resp.json()


async def _stats(session: aiohttp.ClientSession, router: RunningServer) -> dict[str, Any]:
    async with session.get(router.url + "/stats") as resp:
        assert resp.status == 200
        stats: dict[str, Any] = await resp.json()
        return stats


def _predicted(stats: dict[str, Any]) -> dict[str, int]:
    return {row["url"]: row["predicted_cached_tokens"] for row in stats["backends"]}


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def pool_of_two() -> AsyncIterator[list[str]]:
    async with sims(2, speedup=20.0) as handles:
        yield [h.url for h in handles]


@needs_redis
async def test_a_prefix_routed_by_one_replica_guides_the_other(
    redis_server: RedisServer, pool_of_two: list[str]
) -> None:
    x, y = pool_of_two[1], pool_of_two[0]  # A's first choice, B's on its own
    shared = {"policy": "cost", "state": redis_server.url, "cluster": "test-pool"}
    async with (
        router_for([x, y], replica_id="router-a", **shared) as a,
        router_for([y, x], replica_id="router-b", **shared) as b,
        router_for([y, x], policy="cost") as lone,
        aiohttp.ClientSession() as session,
    ):

        async def formed() -> bool:
            seen = [(await _stats(session, r))["replicas"]["replicas"] for r in (a, b)]
            return all(s == ["router-a", "router-b"] for s in seen)

        await _until(formed)

        backend, first = await _chat(session, a, turns=1)
        assert backend == x
        assert first["usage"]["prompt_tokens"] > 3000

        async def heard() -> bool:  # A's Routed and Ended (no first token: not streamed)
            return bool((await _stats(session, b))["replicas"]["applied"] >= 2)

        await _until(heard)
        backend, second = await _chat(session, b, turns=2)
        assert backend == x, "B follows the prefix A left at X"
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 3000
        predicted = _predicted(await _stats(session, b))
        assert predicted[x] > 3000 and predicted[y] == 0

        # A lone router (memory state) was told nothing: no belief, its own tie-break.
        backend, _ = await _chat(session, lone, turns=2)
        assert backend == y
        assert _predicted(await _stats(session, lone)) == {x: 0, y: 0}
        lone_replicas = (await _stats(session, lone))["replicas"]
        assert lone_replicas["enabled"] is False and lone_replicas["received"] == 0

        stats_b = (await _stats(session, b))["replicas"]
        assert stats_b["replica"] == "router-b" and stats_b["cluster"] == "test-pool"
        assert stats_b["connected"] is True and stats_b["malformed"] == 0
        assert stats_b["published"] >= 2  # its own turn went out too
        metrics = await (await session.get(b.url + "/metrics")).text()
        assert "prefix_router_replicas 2" in metrics
        assert "prefix_router_remote_events_applied_total 2" in metrics

        # Redis goes away mid-run: both replicas keep answering on their local state.
        redis_server.stop()
        for turn in (3, 4):
            for router in (a, b):
                backend, answer = await _chat(session, router, turns=turn)
                assert backend == x  # each still knows the conversation's prefix is at X
                assert answer["choices"][0]["message"]["content"]

        async def noticed() -> bool:
            states = [(await _stats(session, r))["replicas"] for r in (a, b)]
            return all(s["connected"] is False and s["outages"] == 1 for s in states)

        await _until(noticed)


async def test_memory_state_is_the_default_and_shares_nothing(pool_of_two: list[str]) -> None:
    async with (
        router_for(pool_of_two, policy="cost") as router,
        aiohttp.ClientSession() as session,
    ):
        assert router.state.sync.enabled is False
        await _chat(session, router, turns=1)
        replicas = (await _stats(session, router))["replicas"]
        assert replicas["enabled"] is False and replicas["published"] == 0
        assert replicas["replicas"] == [replicas["replica"]]
        metrics = await (await session.get(router.url + "/metrics")).text()
        assert "prefix_router_replicas 1" in metrics
        assert "prefix_router_remote_events_applied_total 0" in metrics


def test_serve_state_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    help_text = parser.format_help()
    for flag in ("--state URL", "--cluster NAME", "--replica-id ID", "redis://"):
        assert flag in help_text
    cfg = load_config(None, state="redis://r:6379/0", cluster="gpu-pool", replica_id="r1")
    assert (cfg.state, cfg.cluster, cfg.replica_id) == ("redis://r:6379/0", "gpu-pool", "r1")
    assert load_config(None).state == "memory" and load_config(None).replica_id is None
    for bad in (["--state", "http://r:6379"], ["--cluster", "a b"], ["--replica-id", "x/y"]):
        args = parser.parse_args(["--backend", "127.0.0.1:1", *bad])
        assert serve_command.run(args) == 2
        assert "bad configuration" in capsys.readouterr().err
