"""`--slo-ttft-p90 auto` (router.replay.slo): 2 x round_robin's idle p90, and who reports it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from router.cli import main
from router.replay.gentrace import SharedPrefixConfig, shared_prefix
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.slo import auto_slo, parse_slo
from router.replay.traces import load_trace, write_mooncake

PROFILE = "llama3-8b-h100"


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SharedPrefixConfig(
        groups=3, prompts_per_group=8, system_prompt_len=6000, question_len=300,
        output_len=32, request_rate=10.0, seed=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("slo") / "long.jsonl"
    write_mooncake(shared_prefix(cfg), path)
    return path


def test_parse_slo() -> None:
    assert parse_slo("auto") is None and parse_slo(" AUTO ") is None
    assert parse_slo("1.5") == 1.5
    for bad in ("0", "-1", "inf", "nan", "fast"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_auto_slo_is_twice_round_robins_idle_p90(trace_path: Path) -> None:

    trace = load_trace(trace_path)
    pool = SimConfig(profiles=(PROFILE,) * 2, load=3.0)  # its load is not the idle one
    idle_p90 = simulate_policy(trace, "round_robin", SimConfig(profiles=(PROFILE,) * 2, load=0.05))
    want = math.ceil(2 * idle_p90.summary["ttft_p90"] * 100) / 100
    assert auto_slo(trace, pool) == want
    assert want >= 2 * idle_p90.summary["ttft_p90"] > 0


def test_simulate_find_capacity_with_auto_reports_the_slo(
    trace_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    code = main([
        "simulate", "--trace", str(trace_path), "--backends", "2", "--profile", PROFILE,
        "--policies", "round_robin", "--find-capacity", "--slo-ttft-p90", "auto",
        "--capacity-precision", "0.25", "--json", str(out), "--quiet",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err

    want = auto_slo(load_trace(trace_path), SimConfig(profiles=(PROFILE,) * 2))
    cap = json.loads(out.read_text())["capacity"]["round_robin"]
    assert cap["slo_ttft_p90"] == want and cap["slo_source"] == "auto"
    assert cap["max_load"] > 0  # an auto SLO is one round_robin can meet
    assert f"--slo-ttft-p90 auto: {want:g} s" in err
    assert main(["simulate", "--trace", str(trace_path), "--slo-ttft-p90", "soon"]) == 2
