"""`prefix-router plan`: backends needed per policy, the witness one smaller, and --check.

The trace is a small generated multi-turn window written as a recording would be (64-token
blocks declared per line, with the live fields `plan --check` reads). The 70B profile makes a
single backend miss a 1 s p90 on it, so every answer has a pool one smaller that was simulated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.sim.perf import get_profile
from router.cli import main
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.plan import PlanConfig, backends_needed, with_host_cache
from router.replay.traces import Trace, load_trace

PROFILE = "llama3-70b-h100-tp4"


def _trace() -> Trace:
    cfg = MultiTurnConfig(
        duration_s=60.0, session_rate=5.0, turns_mean=4.0, think_median_s=8.0, block_size=64
    )
    return multi_turn(cfg)


def _recording(tmp_path: Path, trace: Trace, *, ttft: float) -> Path:
    """The trace as `serve --record` writes it: block_size, backend, ttft, status, policy, pool."""
    path = tmp_path / "rec.jsonl"
    with path.open("w") as f:
        for i, r in enumerate(trace.requests):
            obj = {
                "timestamp": round(r.timestamp * 1000),
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
                "block_size": 64,
                "backend": f"b-{i % 2}",
                "status": 200,
                "ttft": ttft,
                "policy": "cost",
                "pool": 2,
            }
            f.write(json.dumps(obj) + "\n")
    return path


def test_backends_needed_comes_with_a_smaller_pool_that_misses() -> None:
    trace = _trace()
    cfg = PlanConfig(profile=get_profile(PROFILE), slo_ttft_p90=1.0)
    point = backends_needed(trace, "round_robin", 2.0, cfg)
    assert point.backends is not None and point.backends >= 2
    assert point.meets is not None and point.meets.meets
    assert point.meets.ttft_p90 <= 1.0
    assert point.one_fewer is not None and not point.one_fewer.meets
    assert point.one_fewer.backends == point.backends - 1
    assert point.lru_bound_hit_ratio is not None
    assert point.meets.hit_ratio <= point.lru_bound_hit_ratio + 1e-9


def test_an_unreachable_slo_says_so() -> None:
    cfg = PlanConfig(profile=get_profile(PROFILE), slo_ttft_p90=1e-6, max_backends=3)
    point = backends_needed(_trace(), "round_robin", 1.0, cfg)
    assert point.backends is None and point.meets is None
    assert [p.backends for p in point.probes] == [1, 2, 3]


def test_host_cache_adds_a_host_tier_once() -> None:
    base = get_profile("llama3-8b-h100")
    host = with_host_cache(base)
    assert host.host_capacity_tokens == 4 * base.kv_capacity_tokens
    assert with_host_cache(host) is host


def test_plan_command_writes_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = _recording(tmp_path, _trace(), ttft=0.5)
    assert load_trace(rec).block_size == 64
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    code = main(
        [
            "plan", "--trace", str(rec), "--profile", PROFILE, "--slo-ttft-p90", "1",
            "--growth", "1,2", "--policies", "round_robin,cost", "--json", str(out),
            "--plot", str(png), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc["plan"]) == {"round_robin", "cost"}
    for points in doc["plan"].values():
        assert [p["growth"] for p in points] == [1.0, 2.0]
        for p in points:
            assert p["meets"]["ttft_p90"] <= 1.0
            assert p["one_fewer"] is None or not p["one_fewer"]["meets"]
    assert png.stat().st_size > 1000
    assert "round_robin" in capsys.readouterr().out


def test_plan_check_sets_simulated_beside_live(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = _recording(tmp_path, _trace(), ttft=0.25)
    out = tmp_path / "check.json"
    code = main(["plan", "--trace", str(rec), "--profile", PROFILE, "--check", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["backends"] == 2 and doc["policy"] == "cost"
    assert doc["ttft_live"]["mean"] == pytest.approx(0.25)
    assert doc["ttft_simulated"]["count"] == len(_trace().requests)
    ratio = doc["ttft_simulated"]["mean"] / 0.25
    assert doc["mean_ratio_simulated_over_live"] == pytest.approx(ratio)
    assert "simulated / live mean" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--growth", "1,x"], "--growth"),
        (["--growth", "0"], "positive"),
        (["--policies", "nope"], "unknown policy"),
        (["--profile", "nope"], "unknown profile"),
    ],
)
def test_plan_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rec = _recording(tmp_path, _trace(), ttft=0.1)
    assert main(["plan", "--trace", str(rec), *args]) == 2
    assert message in capsys.readouterr().err


def test_check_needs_a_recording(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--trace", "conversation", "--duration", "30", "--check"]) == 2
    assert "--check needs a recorded file" in capsys.readouterr().err
