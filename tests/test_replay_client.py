"""The replay client and `prefix-router replay` against simulated servers and closed ports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, free_port, serving

from router.cli import main
from router.replay.client import ReplayConfig, failure_status, replay, run_summary
from router.replay.traces import Trace, TraceRequest, write_mooncake

SUMMARY_KEYS = {"requests", "failed", "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99",
                "tpot_mean", "e2e_mean", "hit_ratio", "wall_s"}  # fmt: skip


def _trace(n: int = 6, gap: float = 0.5, out: int = 8) -> Trace:
    reqs = tuple(
        TraceRequest(index=i, timestamp=i * gap, input_length=700 + 10 * i, output_length=out + i,
                     hash_ids=(0, 100 + i))
        for i in range(n)
    )  # fmt: skip
    return Trace(name="small", block_size=512, requests=reqs)


@pytest.mark.parametrize("api", ["completions", "chat", "generate"])
async def test_replay_records_every_request(sim_servers: Any, api: Any) -> None:
    (server,) = await sim_servers(1, speedup=4.0)
    trace = _trace(out=60)  # long enough to stream in several 20 ms chunks
    run = await replay(trace, ReplayConfig(url=server.url, api=api, speedup=4.0))
    assert [o.rid for o in run.outcomes] == [f"r{i}" for i in range(6)]
    for o, r in zip(run.outcomes, trace.requests, strict=True):
        assert not o.failed, o.error
        assert o.output_tokens == r.output_length  # max_tokens + ignore_eos
        assert o.ttft is not None and o.e2e is not None and 0 < o.ttft <= o.e2e
        assert o.tpot is not None and o.tpot > 0
        if api != "chat":  # the chat template adds its own tokens
            assert o.prompt_tokens == r.input_length
    assert sum(o.cached_tokens for o in run.outcomes[1:]) >= 5 * 496  # shared block 0
    summary = run_summary(run)
    assert summary.keys() >= SUMMARY_KEYS and summary["failures"] == []


def _write_trace(tmp_path: Path) -> Path:
    path = tmp_path / "small.jsonl"
    write_mooncake(_trace(), path)
    return path


def test_cli_replay_writes_json_and_plot(sim_process: Any, tmp_path: Path) -> None:
    sp = sim_process(count=1, speedup=10.0)
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "router", "replay", "--trace", str(_write_trace(tmp_path)),
         "--url", sp.urls[0], "--api", "completions", "--speedup", "10", "--name", "sim",
         "--duration", "2.2", "--json", str(out), "--plot", str(plot), "--quiet"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["trace"] == "small" and doc["api"] == "completions"
    res = doc["results"]["sim"]
    assert res.keys() >= SUMMARY_KEYS
    assert res["requests"] == 5 and res["failed"] == 0 and res["ttft_mean"] > 0
    assert plot.stat().st_size > 1000


async def test_closed_port_fails_every_request_with_its_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = await replay(_trace(3, 0.01), ReplayConfig(url=url))
    assert len(run.outcomes) == 3
    assert all(
        o.failed and o.error and o.error.startswith("connection error") for o in run.outcomes
    )
    assert run_summary(run)["failed"] == 3


async def test_http_errors_keep_their_status() -> None:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no capacity"}}, status=503)

    app = web.Application()
    app.router.add_post("/v1/completions", refuse)
    async with serving(app) as port:
        run = await replay(_trace(2, 0.01), ReplayConfig(url=f"http://127.0.0.1:{port}"))
    assert [o.error for o in run.outcomes] == ["HTTP 503: no capacity"] * 2
    assert [f["status"] for f in run_summary(run)["failures"]] == [503, 503]
    assert failure_status("connection error: x") is None


def test_cli_closed_port_still_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "closed.json"
    code = main(["replay", "--trace", str(_write_trace(tmp_path)), "--quiet",
                 "--url", f"http://127.0.0.1:{free_port()}", "--json", str(out)])  # fmt: skip
    assert code == 1
    res = json.loads(out.read_text())["results"]["replay"]
    assert res["requests"] == res["failed"] == 6
    assert len(res["failures"]) == 6 and all("connection" in f["error"] for f in res["failures"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--url", "ftp://x"], "url must start"),
        (["--url", "http://127.0.0.1:1", "--load", "0"], "load must be positive"),
        (["--url", "http://127.0.0.1:1", "--duration", "-1"], "--duration"),
        (["--url", "http://127.0.0.1:1", "--start", "99999"], "no requests"),
        (["--url", "http://127.0.0.1:1", "--api", "nope"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    argv = ["replay", "--trace", str(_write_trace(tmp_path)), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unknown_trace_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--trace", "no-such-trace", "--url", "http://127.0.0.1:1"]) == 2
    assert "unknown bundled trace" in capsys.readouterr().err


async def test_the_stream_reader_gives_the_same_figures_however_the_reads_are_cut() -> None:
    """SSE lines split anywhere across reads (a chunk boundary mid-event) fold the same way."""
    import asyncio

    from router.replay.client import _SseReader, _Stream

    events = [
        {"choices": [{"text": " a"}]},
        {"choices": [{"text": " b"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                                  "prompt_tokens_details": {"cached_tokens": 3}}},
    ]  # fmt: skip
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body += b"data: [DONE]\n\n"
    loop = asyncio.get_running_loop()
    whole = _Stream()
    _SseReader(whole, "completions", loop).feed(body)
    assert (whole.chunks, whole.prompt_tokens, whole.output_tokens, whole.cached_tokens) == (
        2, 7, 2, 3
    )  # fmt: skip
    for cut in range(1, len(body)):
        st = _Stream()
        reader = _SseReader(st, "completions", loop)
        reader.feed(body[:cut])
        reader.feed(body[cut:])
        assert (st.chunks, st.prompt_tokens, st.output_tokens, st.cached_tokens) == (2, 7, 2, 3)
        assert st.error is None
