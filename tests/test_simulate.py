"""`prefix-router simulate` end to end, and the capacity search it uses.

The workload is a small generated shared-prefix trace (16 groups x 12 questions, a 4,096-token
system prompt = 8 blocks of 512, a 128-token question in a partial 9th block), written to disk
with `router.replay.gentrace` and read back by the CLI. Its ideal hit ratio is hand-checkable:
each group's first request misses everything, the other 11 hit the 8 shared blocks, so
16 * 11 * 4096 / (192 * 4224) = 8/9.

The capacity search is checked on p90(load) = load, whose probes are easy to follow in log2:
bracket by doubling (0, 1, 2 -> 4 fails), then geometric bisection (1.5, 1.75, 1.625, 1.5625)
until hi/lo <= 1.05.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from router.cli import main
from router.replay.gentrace import SharedPrefixConfig, shared_prefix
from router.replay.simulate import find_capacity
from router.replay.traces import write_mooncake

REPO_ROOT = Path(__file__).resolve().parent.parent

GROUPS, PER_GROUP, SYSTEM, QUESTION = 16, 12, 4096, 128
REQUESTS = GROUPS * PER_GROUP
IDEAL = GROUPS * (PER_GROUP - 1) * SYSTEM / (REQUESTS * (SYSTEM + QUESTION))  # = 8/9

RESULT_KEYS = {
    "requests": int,
    "failed": int,
    "ttft_mean": float,
    "ttft_p50": float,
    "ttft_p90": float,
    "ttft_p99": float,
    "tpot_mean": float,
    "e2e_mean": float,
    "hit_ratio": float,
    "ideal_hit_ratio": float,
    "wall_s": float,
}


@pytest.fixture(scope="module")
def gsp_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SharedPrefixConfig(
        groups=GROUPS,
        prompts_per_group=PER_GROUP,
        system_prompt_len=SYSTEM,
        question_len=QUESTION,
        output_len=64,
        request_rate=20.0,
        seed=1,
    )
    path = tmp_path_factory.mktemp("traces") / "gsp.jsonl"
    write_mooncake(shared_prefix(cfg), path)
    return path


def _simulate(capsys: pytest.CaptureFixture[str], trace: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["simulate", "--trace", str(trace), "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json_run(
    capsys: pytest.CaptureFixture[str], trace: Path, tmp_path: Path, *extra: str
) -> dict[str, Any]:
    out = tmp_path / "out.json"
    code, _, err = _simulate(capsys, trace, "--json", str(out), *extra)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def test_cli_end_to_end_json_schema_table_and_plot(gsp_trace: Path, tmp_path: Path) -> None:
    """A real `python -m router simulate` process: DESIGN section 7 JSON, table, PNG."""
    out, png = tmp_path / "sub" / "out.json", tmp_path / "sub" / "ttft.png"
    cmd = [
        sys.executable, "-m", "router", "simulate",
        "--trace", str(gsp_trace), "--backends", "4", "--profile", "llama3-8b-h100",
        "--load", "1.5", "--policies", "round_robin,cache_aware",
        "--find-capacity", "--slo-ttft-p90", "0.3",
        "--json", str(out), "--plot", str(png), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr

    doc = json.loads(out.read_text())
    assert doc["trace"] == "gsp"
    assert doc["backends"] == 4
    assert doc["profile"] == "llama3-8b-h100"
    assert doc["load"] == 1.5
    assert set(doc["results"]) == {"round_robin", "cache_aware"}
    for policy, res in doc["results"].items():
        for key, kind in RESULT_KEYS.items():
            assert isinstance(res[key], kind), (policy, key, res.get(key))
        assert res["requests"] == REQUESTS and res["failed"] == 0
        assert 0 < res["ttft_p50"] <= res["ttft_p90"] <= res["ttft_p99"]
        assert res["ttft_mean"] < res["e2e_mean"]
        assert res["ideal_hit_ratio"] == pytest.approx(IDEAL)
        assert 0 < res["hit_ratio"] <= res["ideal_hit_ratio"] + 1e-9
    assert set(doc["capacity"]) == {"round_robin", "cache_aware"}
    for policy, cap in doc["capacity"].items():
        assert cap["slo_ttft_p90"] == 0.3
        assert isinstance(cap["max_load"], float) and cap["max_load"] > 0, policy
        # The answer is a load that was actually run and met the SLO.
        met = {load for load, p90 in cap["probes"] if p90 is not None and p90 <= 0.3}
        assert cap["max_load"] == max(met)
    # Routing by prefix serves more load within the same SLO on this workload.
    assert doc["capacity"]["cache_aware"]["max_load"] > doc["capacity"]["round_robin"]["max_load"]

    table = done.stdout.splitlines()
    assert any(line.startswith("round_robin") and f" {REQUESTS} " in line for line in table)
    assert any(line.startswith("cache_aware") for line in table)
    assert "capacity at p90 TTFT <= 0.3 s" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_cache_aware_hits_clearly_more_than_round_robin(
    gsp_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 2's must-show: on a shared-prefix workload, routing by prefix wins the cache.

    With 8 backends and 12 questions per group, round robin lands each group on most backends
    and pays the system prompt on each; cache_aware keeps a group together, near the ideal.
    """
    doc = _json_run(
        capsys, gsp_trace, tmp_path, "--backends", "8", "--policies", "round_robin,cache_aware"
    )
    rr, ca = doc["results"]["round_robin"], doc["results"]["cache_aware"]
    assert rr["failed"] == ca["failed"] == 0
    assert ca["hit_ratio"] >= rr["hit_ratio"] + 0.3
    assert ca["hit_ratio"] >= 0.97 * IDEAL
    assert rr["hit_ratio"] < 0.6
    assert ca["ttft_mean"] < rr["ttft_mean"]


def test_start_and_duration_select_a_window(
    gsp_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stamps = [json.loads(line)["timestamp"] for line in gsp_trace.read_text().splitlines()]
    expected = sum(1 for ms in stamps if 2000 <= ms < 5000)
    assert 0 < expected < REQUESTS
    doc = _json_run(
        capsys,
        gsp_trace,
        tmp_path,
        "--policies", "round_robin", "--start", "2", "--duration", "3",
    )  # fmt: skip
    res = doc["results"]["round_robin"]
    assert res["requests"] == expected and res["failed"] == 0
    assert doc["start"] == 2.0 and doc["duration"] == 3.0

    tail = _json_run(capsys, gsp_trace, tmp_path, "--policies", "round_robin", "--start", "5")
    assert tail["results"]["round_robin"]["requests"] == sum(1 for ms in stamps if ms >= 5000)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--policies", "round_robin,nope"], "unknown policy nope"),
        (["--policies", ","], "--policies names no policy"),
        (["--profile", "h100-fantasy"], "unknown profile h100-fantasy"),
        (["--load", "0"], "--load must be a positive number"),
        (["--load", "-1"], "--load must be a positive number"),
        (["--load", "nan"], "--load must be a positive number"),
        (["--backends", "0"], "--backends must be at least 1"),
        (["--start", "-1"], "--start must be non-negative"),
        (["--duration", "0"], "--duration must be positive"),
        (["--start", "100000"], "the trace window holds no requests"),
        (["--slo-ttft-p90", "0", "--find-capacity"], "--slo-ttft-p90 must be a positive"),
        (["--capacity-precision", "1.5", "--find-capacity"], "--capacity-precision must be in"),
        (["--slo-ttft", "2"], "--slo-ttft, --scheduler-budget and --scheduler-headroom need"),
        (["--scheduler-headroom", "off"], "--scheduler-headroom need --scheduler on"),
        (["--scheduler", "on", "--slo-ttft", "-1"], "--slo-ttft must be a positive"),
    ],
)
def test_bad_arguments_give_one_error_line_and_exit_2(
    gsp_trace: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    code, out, err = _simulate(capsys, gsp_trace, *args)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prefix-router simulate: error: ")
    assert fragment in lines[0]


@pytest.mark.parametrize(
    ("trace", "fragment"),
    [
        ("no-such-dir/missing.jsonl", "trace file not found: no-such-dir/missing.jsonl"),
        ("no-such-bundled-name", "unknown bundled trace 'no-such-bundled-name'; known:"),
    ],
)
def test_missing_trace_gives_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], trace: str, fragment: str
) -> None:
    code, out, err = _simulate(capsys, Path(trace))
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"prefix-router simulate: error: {fragment}")


def test_malformed_trace_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}
    bad.write_text(json.dumps(good) + "\n{not json\n")
    code, out, err = _simulate(capsys, bad)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert f"{bad}:2:" in err


def test_non_number_load_is_an_argparse_error(
    gsp_trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--trace", str(gsp_trace), "--load", "fast"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "prefix-router simulate: error: argument --load: invalid float value: 'fast'"
    )


# --- find_capacity on a synthetic monotone p90(load) ------------------------------------


def _log2_probes(result: Any) -> list[float]:
    return [round(math.log2(load), 6) for load, _ in result.probes]


def test_find_capacity_brackets_up_then_bisects() -> None:
    result = find_capacity(lambda load: load, slo=3.0, start=1.0)
    assert _log2_probes(result) == [0, 1, 2, 1.5, 1.75, 1.625, 1.5625]
    assert result.max_load == pytest.approx(2**1.5625)  # 2.9537: highest passing probe
    assert result.max_load <= 3.0 < result.max_load * 1.05
    assert result.slo_ttft_p90 == 3.0
    assert all(p90 == load for load, p90 in result.probes)


def test_find_capacity_brackets_down_from_a_failing_start() -> None:
    result = find_capacity(lambda load: load, slo=3.0, start=8.0)
    assert _log2_probes(result) == [3, 2, 1, 1.5, 1.75, 1.625, 1.5625]
    assert result.max_load == pytest.approx(2**1.5625)


def test_find_capacity_precision_and_failed_runs() -> None:
    """A run with failures reports +inf and counts as over the SLO; precision is honoured."""
    result = find_capacity(
        lambda load: math.inf if load > 5.0 else 0.1, slo=2.0, start=1.0, precision=0.01
    )
    failing = min(load for load, p90 in result.probes if p90 > 2.0)
    assert result.max_load <= 5.0 < failing
    assert failing / result.max_load <= 1.01
    assert 5.0 / result.max_load <= 1.01


def test_find_capacity_edges() -> None:
    never = find_capacity(lambda load: math.inf, slo=1.0)
    assert never.max_load == 0.0
    assert min(load for load, _ in never.probes) < 1e-3 * 2
    always = find_capacity(lambda load: 0.0, slo=1.0, max_steps=10)
    assert len(always.probes) == 10
    assert always.max_load == 2.0**9  # the last doubling that was tried


# --- the bundled conversation trace (issue 2's first must-show) ---------------------------


@pytest.mark.slow
def test_conversation_trace_at_load_1_finishes_every_request(tmp_path: Path) -> None:
    """8 x llama3-8b-h100, load 1, round_robin and cache_aware over all 12,031 requests."""
    out = tmp_path / "conversation.json"
    started = time.perf_counter()
    code = main(
        [
            "simulate", "--trace", "conversation", "--backends", "8",
            "--profile", "llama3-8b-h100", "--load", "1",
            "--policies", "round_robin,cache_aware", "--json", str(out), "--quiet",
        ]
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert code == 0
    doc = json.loads(out.read_text())
    for policy in ("round_robin", "cache_aware"):
        res = doc["results"][policy]
        assert res["requests"] == 12_031 and res["failed"] == 0, policy
        assert res["ideal_hit_ratio"] == pytest.approx(0.37, abs=0.01)
        assert 0 < res["hit_ratio"] <= res["ideal_hit_ratio"]
    rr, ca = doc["results"]["round_robin"], doc["results"]["cache_aware"]
    assert ca["hit_ratio"] > rr["hit_ratio"]
    # The bar is 60 s on this 2-core machine; the simulation itself takes ~15 s.
    assert rr["wall_s"] + ca["wall_s"] < 60.0
    assert elapsed < 120.0


def test_a_run_keeps_the_ttft_each_request_was_predicted_where_the_policy_predicts_one(
    gsp_trace: Path,
) -> None:
    from router.replay.simulate import SimConfig, simulate_policy
    from router.replay.traces import load_trace

    trace = load_trace(gsp_trace)
    config = SimConfig(profiles=("llama3-8b-h100",) * 4)
    cost = simulate_policy(trace, "cost", config)
    assert set(cost.predicted_ttft) == {o.rid for o in cost.outcomes}
    assert all(0 < t < 60 for t in cost.predicted_ttft.values())
    # a cached question is predicted far faster than its group's first, uncached prompt
    assert min(cost.predicted_ttft.values()) < 0.2 * max(cost.predicted_ttft.values())
    assert simulate_policy(trace, "round_robin", config).predicted_ttft == {}


def test_cost_with_kv_events_keeps_groups_together_as_with_its_model(
    gsp_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The simulated engines' KV events drive the cost policy's index (`--kv-events`): a
    shared-prefix workload still lands group by group, hitting as much as with the model."""
    modelled = _json_run(capsys, gsp_trace, tmp_path, "--backends", "8", "--policies", "cost")
    evented = _json_run(
        capsys, gsp_trace, tmp_path, "--backends", "8", "--policies", "cost", "--kv-events"
    )
    m, e = modelled["results"]["cost"], evented["results"]["cost"]
    assert m["failed"] == e["failed"] == 0
    assert e["hit_ratio"] >= 0.97 * IDEAL
    assert e["hit_ratio"] >= m["hit_ratio"] - 0.02


def test_apply_kv_events_sets_the_index_from_engine_events() -> None:
    from backends.sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored
    from router.core.index import PrefixIndex
    from router.replay.simulate import apply_kv_events

    index = PrefixIndex()
    index.add_backend("b", 10_000, 512)
    index.set_event_driven("b", True)
    stored = BlockStored(block_hashes=(1, 2, 3), parent_block_hash=None, token_counts=(512,) * 3)
    host = BlockStored(block_hashes=(9,), parent_block_hash=3, token_counts=(512,), medium="CPU")
    apply_kv_events(index, "b", [stored, host, BlockRemoved(block_hashes=(3,))], 0.0)
    assert index.match([1, 2, 3]) == {"b": 2} and index.match([9]) == {}
    apply_kv_events(index, "b", [AllBlocksCleared()], 0.0)
    assert index.match([1, 2, 3]) == {}


def test_scheduler_on_adds_goodput_shed_and_router_wait_to_each_result(
    gsp_trace: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # 4 GPUs at 20x the trace's rate: far past capacity, so admission at 0.5 s sheds.
    args = ("--backends", "4", "--load", "20", "--policies", "cost", "--scheduler", "on")
    doc = _json_run(capsys, gsp_trace, tmp_path, *args, "--slo-ttft", "0.5")
    assert doc["scheduler"] == "on" and doc["slo_ttft"] == 0.5
    res = doc["results"]["cost"]
    assert res["shed"] > 0 and res["failed"] == res["shed"]
    assert res["goodput_slo_s"] == 0.5
    assert res["goodput_rps"] > 0 and res["router_wait_p90"] >= 0
    assert doc["scheduler_headroom"] == 1.5
    off = _json_run(capsys, gsp_trace, tmp_path, "--backends", "4", "--policies", "cost")
    assert off["scheduler"] == "off" and off["scheduler_headroom"] is None
    assert off["results"]["cost"]["shed"] == 0
    assert off["results"]["cost"]["router_wait_p90"] == 0.0


def test_scheduler_headroom_off_admits_by_the_deadline_alone(
    gsp_trace: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Far past capacity (4 GPUs at 20x): the throughput clock turns away requests the
    # deadline alone would admit; without it fewer are shed and, the batches filled at once,
    # fewer are served within the deadline (here 155 / 67 shed, 44.5 / 30.3 req/s).
    args = ("--backends", "4", "--load", "20", "--policies", "cost", "--scheduler", "on")
    paced = _json_run(capsys, gsp_trace, tmp_path, *args, "--slo-ttft", "0.5")
    unpaced = _json_run(
        capsys, gsp_trace, tmp_path, *args, "--slo-ttft", "0.5", "--scheduler-headroom", "off"
    )
    assert unpaced["scheduler_headroom"] == "off"
    assert unpaced["results"]["cost"]["shed"] < paced["results"]["cost"]["shed"]
    assert unpaced["results"]["cost"]["goodput_rps"] < paced["results"]["cost"]["goodput_rps"]
    wider = _json_run(
        capsys, gsp_trace, tmp_path, *args, "--slo-ttft", "0.5", "--scheduler-headroom", "3"
    )
    assert wider["scheduler_headroom"] == 3.0
