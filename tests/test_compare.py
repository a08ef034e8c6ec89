"""`compare`: fresh pools and routers per target, one replay each, nothing left running."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from router.cli import build_parser
from router.core.policies import POLICIES
from router.replay.compare import (
    CompareConfig,
    ProcessSet,
    histogram_mean,
    parse_targets,
    run_compare,
    sglang_router_argv,
)
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.ports import free_port_block
from router.replay.traces import TraceError, load_window, write_mooncake

needs_sglang_router = pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None, reason="sglang-router not installed"
)


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # the whole group, grandchildren included
    except ProcessLookupError:
        return True
    return False


def test_histogram_mean_sums_every_label_set() -> None:
    text = "\n".join(
        [
            "# TYPE x histogram",
            'x_bucket{le="1.0",backend="a"} 2',
            'x_sum{backend="a"} 1.5',
            'x_count{backend="a"} 2',
            'x_sum{backend="b"} 0.5',
            'x_count{backend="b"} 1.0',
            "x_sum 1.0",
            "x_count 2",
            "xy_sum 100",
        ]
    )
    assert histogram_mean(text, "x") == (3.0, 5)
    assert histogram_mean("", "x") == (0.0, 0)


def test_parse_targets() -> None:
    targets = parse_targets(
        "cost, sglang-router:cache_aware,smg:least_load,smg:cache_aware", sorted(POLICIES)
    )
    assert [(t.kind, t.policy) for t in targets] == [
        ("ours", "cost"),
        ("sglang-router", "cache_aware"),
        ("smg", "least_load"),
        ("smg", "cache_aware"),
    ]
    two = parse_targets("cost,cost@2", sorted(POLICIES))
    assert [(t.name, t.workers) for t in two] == [("cost", 1), ("cost@2", 2)]
    bad_ones = ("nope", "sglang-router:cost", "smg:cost", "smg:", "vllm:cache_aware", "oracle")
    queued = parse_targets("cost+queue,smg:cache_aware+queue", sorted(POLICIES))
    assert [(t.name, t.kind, t.policy, t.queue) for t in queued] == [
        ("cost+queue", "ours", "cost", True),
        ("smg:cache_aware+queue", "smg", "cache_aware", True),
    ]
    bad_ones += ("cost@0", "cost@x", "nope@2", "cost+fast", "sglang-router:cache_aware+queue")
    headrooms = parse_targets("cost+queue=2,cost+queue=off,cost+queue", sorted(POLICIES))
    assert [(t.name, t.queue, t.headroom) for t in headrooms] == [
        ("cost+queue=2", True, "2"),
        ("cost+queue=off", True, "off"),
        ("cost+queue", True, None),
    ]
    bad_ones += ("cost+queue=-1", "cost+queue=lots", "smg:cache_aware+queue=2", "cost+fast=2")
    for bad in (*bad_ones, "cost,cost", ""):
        with pytest.raises(ValueError):
            parse_targets(bad, sorted(POLICIES))


def test_queue_targets_turn_on_each_routers_own_admission() -> None:
    from router.replay.compare import _router_argv

    config = CompareConfig(backends=2, profile="llama3-8b-h100", queue_deadline_s=1.5)
    urls = ["http://a", "http://b"]
    ours, smg = parse_targets("cost+queue,smg:cache_aware+queue", sorted(POLICIES))
    argv = _router_argv(ours, config, 1, urls, 2)
    assert argv[argv.index("--scheduler") + 1] == "on"
    assert argv[argv.index("--slo-ttft") + 1] == "1.5"
    argv = _router_argv(smg, config, 1, urls, 2)
    assert argv[argv.index("--max-concurrent-requests") + 1] == "64"
    assert argv[argv.index("--queue-size") + 1] == "100"
    assert argv[argv.index("--queue-timeout-secs") + 1] == "2"  # whole seconds, rounded
    plain = _router_argv(parse_targets("cost", sorted(POLICIES))[0], config, 1, urls, 2)
    assert "--scheduler" not in plain
    assert "--scheduler-headroom" not in _router_argv(ours, config, 1, urls, 2)
    (wide,) = parse_targets("cost+queue=off", sorted(POLICIES))
    argv = _router_argv(wide, config, 1, urls, 2)
    assert argv[argv.index("--scheduler-headroom") + 1] == "off"
    assert build_parser().parse_args(argv[argv.index("serve") :]).scheduler_headroom == 0.0


def test_load_window_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "mt.jsonl"
    write_mooncake(_small_trace(), path)
    assert len(load_window(str(path), 0.0, 12.0).requests) < len(load_window(str(path)).requests)
    cases = {
        str(tmp_path / "missing.jsonl"): "trace file not found",
        "no-such-bundled-name": "unknown bundled trace 'no-such-bundled-name'; known:",
    }
    for spec, message in cases.items():
        with pytest.raises(TraceError, match=message):
            load_window(spec)
    with pytest.raises(TraceError, match=r"holds no requests \(the trace spans 0-"):
        load_window(str(path), 10_000.0, 5.0)
    with pytest.raises(TraceError, match="duration must be positive"):
        load_window(str(path), 0.0, -1.0)


def test_smg_argv_keeps_its_defaults() -> None:
    from router.replay.launchers import LAUNCHERS, smg_argv

    argv = smg_argv("py", port=7, policy="least_load", worker_urls=["http://a"], metrics_port=8)
    assert argv[:4] == ["py", "-m", "smg", "launch"]
    assert argv[argv.index("--policy") + 1] == "least_load"
    assert argv[argv.index("--prometheus-port") + 1] == "8"
    assert "--load-monitor-interval" not in argv  # SMG's own 10 s
    assert LAUNCHERS["smg"].version == "1.13.0" and "least_load" in LAUNCHERS["smg"].policies


def test_free_port_block_and_sglang_router_argv() -> None:
    import socket

    base = free_port_block(3)
    for port in range(base, base + 3):  # each was free: binding it now succeeds
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    argv = sglang_router_argv(
        "py", port=base, policy="cache_aware", worker_urls=["http://a", "http://b"],
        metrics_port=base + 1,
    )  # fmt: skip
    assert argv[:3] == ["py", "-m", "sglang_router.launch_router"]
    i = argv.index("--worker-urls")
    assert argv[i + 1 : i + 3] == ["http://a", "http://b"]
    assert argv[argv.index("--prometheus-port") + 1] == str(base + 1)


def _small_trace() -> Any:
    cfg = MultiTurnConfig(seed=3, duration_s=24.0, session_rate=0.8, think_median_s=8.0,
                          system_prompt_len=1024, user_len=200, output_len=40)  # fmt: skip
    return multi_turn(cfg).window(0.0, 24.0)


@pytest.mark.slow
@needs_sglang_router
async def test_compare_two_targets_and_no_process_left(tmp_path: Path) -> None:
    trace = _small_trace()
    assert 8 <= len(trace.requests) <= 80
    procs = ProcessSet(tmp_path)
    config = CompareConfig(backends=2, profile="llama3-8b-h100", speedup=4.0)
    targets = parse_targets("cost,sglang-router:round_robin", sorted(POLICIES))
    try:
        runs = await run_compare(trace, targets, config, procs)
    finally:
        procs.stop_all()
    assert set(runs) == {"cost", "sglang-router:round_robin"}
    for run in runs.values():
        assert len(run.outcomes) == len(trace.requests)
        assert all(not o.failed for o in run.outcomes), [o.error for o in run.outcomes]
        assert sum(o.cached_tokens for o in run.outcomes) > 0  # shared system prompt
    # ours names the backend of every request and leaves what it learned; sglang-router neither
    ours, theirs = runs["cost"], runs["sglang-router:round_robin"]
    urls = {row["url"] for row in ours.extra["router_stats"]["backends"]}
    assert len(urls) == 2 and {o.backend for o in ours.outcomes} <= urls
    assert all(o.backend is None for o in theirs.outcomes) and "router_stats" not in theirs.extra
    # where the TTFT went: every sim saw each request's first token; our router saw it later
    # than the engines made it, and the client later still
    n = len(trace.requests)
    split = ours.extra["ttft_split"]
    assert split["backend_count"] == split["router_count"] == n
    client_mean = sum(o.ttft or 0.0 for o in ours.outcomes) / n
    assert 0 < split["backend_mean_s"] <= split["router_mean_s"] <= client_mean
    assert theirs.extra["ttft_split"]["backend_count"] == n
    assert "router_mean_s" not in theirs.extra["ttft_split"]
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == ["cost-sim.log", "cost.log", "sglang-router-round_robin-sim.log",
                    "sglang-router-round_robin.log"]  # fmt: skip
    pids = set(procs.started_pids)
    assert len(pids) == 4 and all(_gone(pid) for pid in pids)


def test_cli_compare_bad_arguments_exit_2(tmp_path: Path) -> None:
    bad = (["--targets", "nope"], ["--profile", "no-such-gpu"], ["--backends", "0"],
           ["--stream-interval", "0"])  # fmt: skip
    for extra in bad:
        proc = subprocess.run(
            [sys.executable, "-m", "router", "compare", "--trace", "conversation", *extra],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("error") == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_sglang_router
def test_cli_compare_writes_results_keyed_by_target(tmp_path: Path) -> None:
    path = tmp_path / "mt.jsonl"
    write_mooncake(_small_trace(), path)
    out = tmp_path / "c.json"
    proc = subprocess.run(
        [sys.executable, "-m", "router", "compare", "--trace", str(path), "--backends", "2",
         "--duration", "12", "--speedup", "4", "--targets", "sglang-router:cache_aware",
         "--stream-interval", "0.05",
         "--json", str(out), "--log-dir", str(tmp_path / "logs"), "--quiet"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    res = doc["results"]["sglang-router:cache_aware"]
    assert doc["stream_interval_s"] == 0.05
    assert res["failed"] == 0 and res["requests"] > 0 and res["ttft_p90"] > 0
    assert "sglang-router:cache_aware" in proc.stdout
