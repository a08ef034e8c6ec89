"""Two router replicas sharing routing state through a real redis-server.

Each replica is a real RoutingCore with the real cost policy and its own StateSync over its own
RedisState (own connections), both in this test's event loop. redis-server runs as a child
process on a free loopback port with persistence off; the tests are skipped when the binary is
missing (Debian: apt-get install redis-server; .ci/run installs it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import redis.asyncio as aioredis
from state_fixtures import SyncedReplica, make_core, prompt

from router.replay.ports import free_port
from router.state import StateSync, SyncConfig
from router.state.events import FirstToken, Routed, encode
from router.state.redis import RedisState

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="redis-server not installed (apt-get install -y redis-server)"
)

FAST = SyncConfig(
    read_timeout_s=0.2,
    heartbeat_s=0.1,
    replica_ttl_s=1.0,
    backoff_min_s=0.02,
    backoff_max_s=0.1,
)


class RedisServer:
    """A redis-server child process on 127.0.0.1:`port`, restartable on the same port."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@dataclass
class Replica(SyncedReplica):
    state: RedisState

    def now(self) -> float:
        return asyncio.get_running_loop().time()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def replicas(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Replica, Replica]]:
    cluster = request.node.name[:60].replace("[", "_").replace("]", "_")
    out = []
    for name in ("r1", "r2"):
        core = make_core()
        state = RedisState(redis_server.url, cluster=cluster, replica=name)
        out.append(Replica(core, StateSync(core, state, FAST), state))
    for r in out:
        await r.sync.start()
    # Both readers anchored and both heartbeats listed: the cluster is formed.
    await until(lambda: all(r.sync.stats()["replicas"] == ["r1", "r2"] for r in out))
    yield out[0], out[1]
    for r in out:
        await r.sync.stop()


async def test_prefix_and_queue_travel_between_replicas(
    replicas: tuple[Replica, Replica],
) -> None:
    r1, r2 = replicas
    # r1 sends an 8k prefix to b (alone, r2 would break the tie toward a).
    assert r1.route(prompt("x", seed=1), exclude=("a",)).backend == "b"
    await until(lambda: r2.sync.applied == 1)
    assert r2.sync.stats()["remote_in_flight"] == {"b": 1}
    # While x's prefill is queued on b, an unrelated 8k prompt from r2 goes to idle a.
    assert r2.core.route(prompt("u", seed=2), r2.now()).backend == "a"
    r2.core.on_failed("u", r2.now())
    # r1's x ends: b is free; r2 predicts the prefix cached there and follows it.
    r1.finish("x")
    await until(lambda: r2.sync.applied == 2)
    assert r2.sync.stats()["remote_in_flight"] == {}
    follow_up = r2.route(prompt("x2", seed=1, extra=(7, 8)))
    assert follow_up.backend == "b"
    assert follow_up.predicted_cached_tokens == 128 * 64
    # r1 hears only r2's event, never its own two.
    await until(lambda: r1.sync.received == 1)
    await asyncio.sleep(0.3)
    assert r1.sync.received == 1 and r2.sync.received == 2
    assert r1.sync.stats()["remote_in_flight"] == {"b": 1}


async def test_own_entries_in_the_stream_are_skipped(
    replicas: tuple[Replica, Replica], redis_server: RedisServer
) -> None:
    r1, r2 = replicas
    # Another process claiming r1's id (a misconfiguration) writes to the same stream.
    twin = RedisState(redis_server.url, cluster=r1.state.cluster, replica="r1")
    try:
        await twin.publish([FirstToken(replica="r1", rid="q", backend="a", t=time.time())])
        await twin.publish(
            [
                Routed(
                    replica="r2",
                    rid="q2",
                    backend="a",
                    blocks=(1,),
                    block_tokens=64,
                    prompt_tokens=10,
                    t=time.time(),
                )
            ]
        )
        await until(lambda: r1.sync.received == 1)  # r2-labelled one only
        await until(lambda: r2.sync.received == 1)  # r1-labelled one only
        await asyncio.sleep(0.3)
        assert r1.sync.received == 1 and r2.sync.received == 1
    finally:
        await twin.close()


async def test_malformed_entries_are_skipped(
    replicas: tuple[Replica, Replica], redis_server: RedisServer
) -> None:
    r1, r2 = replicas
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.xadd(r1.state.events_key, {b"e": b"\xc1garbage"})
        await client.xadd(r1.state.events_key, {b"other": b"x"})
    finally:
        await client.aclose()
    r1.route(prompt("ok", seed=3))
    await until(lambda: r2.sync.applied == 1)
    assert r2.state.malformed == 2


async def test_a_replica_hashing_differently_is_refused_loudly(
    replicas: tuple[Replica, Replica],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    r1, r2 = replicas
    alien = msgpack.unpackb(
        encode(
            Routed(
                replica="alien",
                rid="x",
                backend="b",
                blocks=(1,),
                block_tokens=64,
                prompt_tokens=64,
                t=1.0,
            )
        )
    )
    alien[-1] = "9-0000000000000000"  # another hash scheme
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.xadd(r1.state.events_key, {b"e": msgpack.packb(alien)})
    finally:
        await client.aclose()
    r1.route(prompt("ok", seed=3))
    await until(lambda: r2.sync.applied == 1)
    assert r2.state.mismatched == 1 and r2.state.malformed == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("hashes prompts under scheme '9-0000000000000000'" in r.getMessage() for r in errors)


async def test_redis_outage_routing_continues_and_sync_reconnects(
    replicas: tuple[Replica, Replica],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    r1, r2 = replicas
    caplog.set_level(logging.INFO, logger="router.state.sync")
    redis_server.stop()
    await until(lambda: not r1.sync.connected and not r2.sync.connected)
    for i in range(10):  # routing goes on, on each replica's local state
        r1.route(prompt(f"o{i}", seed=10 + i))
        r1.finish(f"o{i}")
        r2.route(prompt(f"p{i}", seed=30 + i))
        r2.finish(f"p{i}")
    await asyncio.sleep(0.3)  # failed retries, backing off: still one warning each
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert r1.sync.outages == 1 and r2.sync.outages == 1

    redis_server.start()  # same port, empty: the stream and heartbeats are gone
    await until(lambda: r1.sync.connected and r2.sync.connected)
    await until(lambda: all(r.sync.stats()["replicas"] == ["r1", "r2"] for r in (r1, r2)))

    # New traffic flows again (the first event may race r2's reader re-anchoring, so retry).
    # Whatever the outage left queued was Routed+Ended pairs; only n* stay in flight.
    def remote_in_flight() -> int:
        return sum(r2.sync.stats()["remote_in_flight"].values())

    for i in range(20):
        r1.route(prompt(f"n{i}", seed=50 + i))
        try:
            await until(lambda: remote_in_flight() > 0, timeout=0.25)
            break
        except AssertionError:
            continue
    assert remote_in_flight() > 0
    assert any("reachable again" in r.message for r in caplog.records)
