"""`serve --workers N` as a real process tree in front of real `prefix-router sim` backends.

The supervisor is `python -m router serve --workers 2` on a free port; its workers are real
child processes sharing the port (SO_REUSEPORT) and one view through the supervisor's hub.
Clients open a new connection per request (the kernel spreads connections, not requests),
so both workers serve. What is checked: both workers route, each applies the other's events
and the shared prefix stays on one backend; /stats and /metrics count every worker's
requests; an admin change reaches both workers; a killed worker is restarted; SIGTERM stops
the whole tree; a SIGKILLed supervisor leaves no orphan (the parent-death signal). The hub
and the merging of /metrics are also tested on their own, in-process, with real sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import REPO_ROOT, SimProcess
from prometheus_client.parser import text_string_to_metric_families
from test_state_redis import REDIS, RedisServer

from router.replay.ports import free_port
from router.server.metrics import RouterMetrics
from router.server.siblings import merge_metrics, merge_stats
from router.state import FirstToken, HubServer, HubState, Routed, StateUnavailable

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ADMIN = "admin-test-key"
SYSTEM = "You answer questions about the Acme catalogue. " + " ".join(
    f"Item {i} sits in aisle {i % 17}." for i in range(150)
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def _supervisor(
    backends: list[str], tmp_path: Path, *extra: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    log = (tmp_path / f"serve-{port}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "serve", "--workers", "2", "--port", str(port),
        "--backends", ",".join(backends), "--policy", "cost", "--admin-key", ADMIN,
        "--health-interval", "0.5", "--log-level", "warning", *extra,
        stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=REPO_ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / f"serve-{port}.log"
    try:
        # the supervisor prints the workers' pids once every worker answered its /health
        for _ in range(1200):
            assert proc.returncode is None, log_path.read_text()
            if "workers (pids" in log_path.read_text():
                break
            await asyncio.sleep(0.05)
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def _stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/stats") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def _chat(url: str, turn: int) -> str:
    """One request on a connection of its own (so the kernel may pick either worker)."""
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Where is item {turn}?"},
        ],
        "max_tokens": 4,
    }
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.post(url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200, await r.text()
        return r.headers["X-Prefix-Router-Backend"]


async def test_two_workers_serve_as_one_router_and_stop_cleanly(
    sim_process: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sims = sim_process(count=3, speedup=20.0)
    async with _supervisor(sims.urls[:2], tmp_path) as (proc, url):
        chosen = [await _chat(url, turn) for turn in range(40)]
        stats = await _stats(url)
        workers = stats["workers"]
        assert stats["worker_count"] == 2 and stats["workers_missing"] == 0
        routed = [sum(row["routed"] for row in w["backends"]) for w in workers]
        assert sum(routed) == 40 and min(routed) > 0, routed  # both workers served
        assert all(w["replicas"]["applied"] > 0 for w in workers)  # each heard the other
        for _ in range(50):  # each worker lists the hub's members at its next heartbeat (2 s)
            if all(len(w["replicas"]["replicas"]) == 2 for w in workers):
                break
            await asyncio.sleep(0.1)
            workers = (await _stats(url))["workers"]
        assert all(len(w["replicas"]["replicas"]) == 2 for w in workers)
        # one shared view: the common system prompt stays on one backend across workers
        top = max(chosen.count(b) for b in set(chosen))
        assert top >= 36, chosen
        assert sum(row["routed"] for row in stats["backends"]) == 40

        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            samples = {
                (x.name, tuple(sorted(x.labels.items()))): x.value
                for f in text_string_to_metric_families(text)
                for x in f.samples
            }
            requests = sum(
                v for (n, labels), v in samples.items() if n == "prefix_router_requests_total"
            )
            assert requests == 40
            assert samples[("prefix_router_workers", ())] == 2

            # an admin change made through the port reaches both workers
            headers = {"Authorization": f"Bearer {ADMIN}"}
            added = {"url": sims.urls[2]}
            async with s.post(url + "/admin/backends", json=added, headers=headers) as r:
                assert r.status == 201, await r.text()
                assert r.headers["X-Prefix-Router-Workers"] == "2/2"
        stats = await _stats(url)
        for w in stats["workers"]:
            assert {row["url"] for row in w["backends"]} == set(sims.urls)

        pids = [w["pid"] for w in stats["workers"]]
        assert all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not any(_alive(pid) for pid in pids), "a worker outlived its supervisor"


async def test_dead_worker_restarts_and_killed_supervisor_leaves_no_orphans(
    sim_process: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sims = sim_process(count=1, speedup=20.0)
    async with _supervisor(sims.urls, tmp_path) as (proc, url):
        before = {w["worker"]: w["pid"] for w in (await _stats(url))["workers"]}
        os.kill(before[0], signal.SIGKILL)
        await _until(lambda: not _alive(before[0]), 10, "the killed worker to go")

        async def restarted() -> dict[int, int]:
            stats = await _stats(url)
            return {w["worker"]: w["pid"] for w in stats["workers"]}

        deadline = time.monotonic() + 30
        while True:
            with_pids = await restarted()
            if len(with_pids) == 2 and with_pids[0] != before[0]:
                break
            assert time.monotonic() < deadline, f"worker 0 not restarted: {with_pids}"
            await asyncio.sleep(0.2)
        assert with_pids[1] == before[1]
        assert await _chat(url, 1) == sims.urls[0]

        proc.kill()  # no chance to stop its workers: the parent-death signal must
        await proc.wait()
        pids = list(with_pids.values())
        await _until(lambda: not any(_alive(p) for p in pids), 20, "orphaned workers to exit")


@pytest.mark.skipif(REDIS is None, reason="redis-server not installed")
async def test_workers_share_through_redis_when_given(
    sim_process: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sims = sim_process(count=2, speedup=20.0)
    redis = RedisServer(free_port(), tmp_path)
    redis.start()
    try:
        extra = ("--state", redis.url, "--cluster", "workers-test", "--replica-id", "r")
        async with _supervisor(sims.urls, tmp_path, *extra) as (proc, url):
            chosen = [await _chat(url, turn) for turn in range(30)]
            workers = (await _stats(url))["workers"]
            assert sorted(w["replicas"]["replica"] for w in workers) == ["r-w0", "r-w1"]
            assert all(w["replicas"]["applied"] > 0 for w in workers), workers
            assert max(chosen.count(b) for b in set(chosen)) >= 27, chosen
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        redis.stop()


async def test_hub_relays_events_between_workers_and_reports_loss(tmp_path: Path) -> None:
    hub = HubServer(tmp_path / "hub.sock")
    await hub.start()
    a = HubState(hub.url, replica="w0")
    b = HubState(hub.url, replica="w1")
    try:
        await a.heartbeat(5.0)
        await b.heartbeat(5.0)
        for _ in range(40):  # like a Redis reader, a member hears what is sent after it joined
            if sorted(await a.replicas()) == ["w0", "w1"]:
                break
            await asyncio.sleep(0.05)
        assert sorted(await a.replicas()) == ["w0", "w1"]
        routed = Routed(
            replica="w0", rid="r1", backend="http://x", blocks=(1, -2, 3),
            block_tokens=64, prompt_tokens=192, max_tokens=8, t=1.0,
        )  # fmt: skip
        first = FirstToken(replica="w0", rid="r1", backend="http://x", t=2.0)
        await a.publish([routed, first])
        got: list[Any] = []
        for _ in range(20):
            got += await b.read(0.5)
            if len(got) == 2:
                break
        assert got == [routed, first]
        assert await a.read(0.05) == []  # never its own events
        await hub.close()
        with pytest.raises(StateUnavailable):
            for _ in range(20):  # the loss is noticed on the next read
                await b.read(0.1)
    finally:
        await a.close()
        await b.close()
        await hub.close()


def test_merged_metrics_sum_counts_and_recompute_ratios() -> None:
    one, two = RouterMetrics(), RouterMetrics()
    one.requests.inc("/v1/chat/completions", "200", amount=3)
    two.requests.inc("/v1/chat/completions", "200", amount=5)
    one.prompt_tokens.inc("http://x", amount=100)
    one.reported_cached.inc("http://x", amount=100)
    two.prompt_tokens.inc("http://x", amount=300)
    one.in_flight.inc(amount=2)
    two.in_flight.inc(amount=1)
    one.backend_healthy.set("http://x", value=1.0)
    two.backend_healthy.set("http://x", value=0.0)
    one.ttft.observe("http://x", value=0.02)
    two.ttft.observe("http://x", value=0.02)
    merged = merge_metrics([one.render(), two.render()])
    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for f in text_string_to_metric_families(merged)
        for x in f.samples
    }
    chat = (("endpoint", "/v1/chat/completions"), ("status", "200"))
    assert samples[("prefix_router_requests_total", chat)] == 8
    assert samples[("prefix_router_in_flight", ())] == 3
    assert samples[("prefix_router_backend_healthy", (("backend", "http://x"),))] == 0
    assert samples[("prefix_router_ttft_seconds_count", (("backend", "http://x"),))] == 2
    assert samples[("prefix_router_hit_ratio", ())] == pytest.approx(100 / 400)
    assert samples[("prefix_router_workers", ())] == 2


def test_merged_stats_sum_backend_counts_and_keep_each_worker() -> None:
    row = {"url": "http://x", "healthy": True, "routed": 2, "load": 1}
    bodies = [
        {"worker": 0, "in_flight": 1, "backends": [row]},
        {"worker": 1, "in_flight": 2, "backends": [{**row, "healthy": False, "routed": 5}]},
    ]
    merged = merge_stats(bodies, missing=1)
    assert merged["in_flight"] == 3 and merged["worker_count"] == 3
    assert merged["backends"] == [{"url": "http://x", "healthy": False, "routed": 7, "load": 2}]
    assert merged["replicas"] is None  # these bodies had no shared-state link
    assert merged["workers"] == bodies


def test_each_worker_records_to_its_own_file() -> None:
    from router.server.workers import _record_path

    assert _record_path("/data/trace.jsonl", 1) == "/data/trace.w1.jsonl"
    assert _record_path("/data/trace-{pid}.jsonl", 1) == "/data/trace-{pid}.jsonl"
    assert _record_path("/data/{replica}.jsonl", 0) == "/data/{replica}.jsonl"
    assert _record_path(None, 0) is None
