"""Recording routed traffic (`serve --record`) and reading it back: replay, simulate, merge.

Real parts throughout: simulated SGLang backends over HTTP, the real router, the real replay
client, the real simulator. The one stand-in is the slow writer (a file whose write blocks on
an event): a disk that stalls on demand cannot be had otherwise. The failing writer is real:
/dev/full answers every write with ENOSPC, as a full disk does.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from typing import IO, Any

import pytest
from server_fixtures import cache_policy, serving

from router.commands.merge_traces import run as merge_run
from router.replay.client import ReplayConfig, replay
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.recording import leaked_prompt_words, live_view, merge
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace, load_trace
from router.server.recorder import Recorder, RecorderConfig

ADMIN = "admin-secret"


def _small_trace() -> Trace:
    """About 30 multi-turn requests over 20 s, prompts of ~600-1500 tokens."""
    cfg = MultiTurnConfig(
        duration_s=20.0,
        session_rate=0.6,
        turns_mean=4.0,
        system_prompt_len=512,
        user_len=150,
        output_len=20,
        think_median_s=3.0,
        seed=3,
    )
    return multi_turn(cfg)


async def _record(trace: Trace, path: Path, *, speedup: float = 20.0) -> list[Any]:
    """Replay `trace` through a recording router; the outcomes (recording closed at exit)."""
    async with serving(2, speedup=speedup, policy=cache_policy(), record=str(path)) as s:
        run = await replay(
            trace,
            ReplayConfig(url=s.url, api="completions", speedup=speedup, request_timeout_s=60),
        )
    return run.outcomes


async def test_recording_replays_and_simulates_like_the_original(tmp_path: Path) -> None:
    trace = _small_trace()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    outcomes = await _record(trace, first)
    await _record(trace, second)
    assert all(not o.failed for o in outcomes)

    rec = load_trace(first)
    assert rec.block_size == 64  # the router's blocks, declared in the file
    assert len(rec.requests) == len(trace.requests)
    assert [r.input_length for r in rec.requests] == [r.input_length for r in trace.requests]
    assert [r.output_length for r in rec.requests] == [r.output_length for r in trace.requests]

    # no prompt text: no word of any prompt occurs in the file except as a field's own name
    assert not leaked_prompt_words(first, trace)
    lines = [json.loads(x) for x in first.read_text().splitlines()]
    assert all(
        set(obj) >= {"backend", "ttft", "cached_tokens", "endpoint", "model"} for obj in lines
    )

    # the same traffic recorded twice: the same structure under different ids
    other = load_trace(second)
    ids_a = {i for r in rec.requests for i in r.hash_ids}
    ids_b = {i for r in other.requests for i in r.hash_ids}
    assert not ids_a & ids_b
    pairs = {
        (a, b)
        for ra, rb in zip(rec.requests, other.requests, strict=True)
        for a, b in zip(ra.hash_ids, rb.hash_ids, strict=True)
    }
    assert len(pairs) == len(ids_a) == len(ids_b)  # a bijection: equal prefixes, equal ids

    # simulated on the same pool, the recording hits like the original
    cfg = SimConfig(profiles=("llama3-8b-h100",) * 2)
    orig = simulate_policy(trace, "cache_aware", cfg).summary["hit_ratio"]
    again = simulate_policy(rec, "cache_aware", cfg).summary["hit_ratio"]
    assert orig > 0.3
    assert abs(orig - again) < 0.02

    live = live_view(first)
    assert live.backends == 2  # the pool recorded, whether or not the policy used it all
    assert live.policy == cache_policy() and live.failed == 0
    assert len(live.ttfts) == len(trace.requests)


async def test_a_failing_disk_fails_no_request(tmp_path: Path) -> None:
    async with serving(1, policy="round_robin", record="/dev/full") as s:
        for i in range(6):
            body = {"prompt": f"hello {i}", "max_tokens": 3}
            async with s.session.post(f"{s.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
        recorder = s.router.state.proxy.recorder
        assert recorder is not None
        assert recorder.flush()
        status = recorder.status()
    assert status["written"] == 0
    assert status["dropped_write_failed"] == 6
    assert "No space left" in (status["last_error"] or "") or "28" in status["last_error"]


class _StalledFile(io.BytesIO):
    """A file whose writes wait until released: a disk that stalls."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def write(self, data: Any) -> int:
        self.release.wait(10)
        return super().write(data)


async def test_a_stalled_writer_drops_records_not_requests(tmp_path: Path) -> None:
    release = threading.Event()

    def opener(_path: Path) -> IO[bytes]:
        return _StalledFile(release)

    async with serving(1, policy=cache_policy()) as s:  # a policy that builds blocks
        proxy = s.router.state.proxy
        proxy.recorder = Recorder(
            RecorderConfig(path=tmp_path / "r.jsonl", key=b"k" * 32, queue_size=2),
            clock_start=asyncio.get_running_loop().time(),
            opener=opener,
        )

        async def one(i: int) -> int:
            body = {"prompt": f"hi {i}", "max_tokens": 2, "stream": True}
            async with s.session.post(f"{s.url}/v1/completions", json=body) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(10))), 20)
        assert statuses == [200] * 10
        recorder = proxy.recorder
        assert recorder.dropped_full >= 6  # two in the writer's stalled hands, two queued
        release.set()
        assert recorder.flush()
        assert recorder.written + recorder.dropped_full == 10
        proxy.recorder = None
        recorder.close()


async def test_admin_api_starts_and_stops_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "rec-{replica}.jsonl"
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with serving(1, policy="round_robin", admin_key=ADMIN) as s:
        async with s.session.post(f"{s.url}/admin/record", json={"path": str(path)}) as resp:
            assert resp.status == 401
        async with s.session.post(
            f"{s.url}/admin/record", json={"path": str(path)}, headers=auth
        ) as resp:
            assert resp.status == 201
            started = await resp.json()
        async with s.session.post(
            f"{s.url}/admin/record", json={"path": str(path)}, headers=auth
        ) as resp:
            assert resp.status == 409
        body = {"prompt": "one two three", "max_tokens": 2}
        async with s.session.post(f"{s.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
        async with s.session.delete(f"{s.url}/admin/record", headers=auth) as resp:
            assert resp.status == 200
            stopped = await resp.json()
        async with s.session.get(f"{s.url}/admin/record", headers=auth) as resp:
            assert (await resp.json())["recording"] is False
    written = Path(started["path"])
    assert written.name == f"rec-{s.router.state.sync.replica}.jsonl"
    assert stopped["last"]["written"] == 1
    assert load_trace(written).requests[0].input_length > 0


def _flight(i: int, blocks: tuple[int, ...], started: float) -> Any:
    from backends.sglang import TokenUsage
    from router.core.model import RouteRequest

    class F:
        endpoint = "/v1/completions"
        model = "m"
        backend = "http://b:1"
        status = 200
        ttft_s = 0.1
        usage = TokenUsage(prompt_tokens=100, completion_tokens=5, cached_tokens=0)

    f = F()
    f.started = started  # type: ignore[attr-defined]
    f.route = RouteRequest(  # type: ignore[attr-defined]
        rid=str(i), blocks=blocks, block_tokens=64, prompt_tokens=64 * len(blocks)
    )
    return f


def test_rotation_and_merge_keep_every_record(tmp_path: Path) -> None:
    key = b"s" * 32
    paths = []
    for name, offset in (("x", 0.0), ("y", 0.05)):
        path = tmp_path / f"{name}.jsonl"
        rec = Recorder(RecorderConfig(path=path, key=key, max_bytes=1024, keep=50), clock_start=0)
        for i in range(20):
            rec.offer(_flight(i, (1, 2, 3 + i % 3), offset + i * 0.1))
        rec.close()
        assert rec.written == 20 and rec.files > 1
        paths += sorted(tmp_path.glob(f"{name}.jsonl*"))
    merged = merge(paths)
    assert len(merged) == 40
    stamps = [obj["timestamp"] for obj in merged]
    assert stamps == sorted(stamps)
    # one secret: both processes' equal prefixes share the compact ids 0, 1, 2...
    assert {i for obj in merged for i in obj["hash_ids"]} == {0, 1, 2, 3, 4}
    out = tmp_path / "merged.jsonl"
    args = type("A", (), {"files": paths, "out": out})()
    assert merge_run(args) == 0
    assert len(load_trace(out).requests) == 40


@pytest.mark.parametrize("bad", ["[1, 2]", '{"path": 3}'])
async def test_admin_record_rejects_bad_bodies(bad: str) -> None:
    async with serving(1, policy="round_robin", admin_key=ADMIN) as s:
        headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
        async with s.session.post(f"{s.url}/admin/record", data=bad, headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "path"
