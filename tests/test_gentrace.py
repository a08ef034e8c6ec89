"""gen-trace: determinism by seed, real prefix sharing, growing chains, and the CLI."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from pathlib import Path

import pytest

from router.cli import main
from router.replay.analyze import ideal_hit_ratio, lru_hit_ratio
from router.replay.gentrace import (
    MultiTurnConfig,
    SharedPrefixConfig,
    multi_turn,
    shared_prefix,
)
from router.replay.traces import TraceRequest, bundled, load_trace

SMALL_SP = SharedPrefixConfig(
    groups=6, prompts_per_group=10, system_prompt_len=2000, question_len=100, request_rate=5.0
)
SMALL_MT = MultiTurnConfig(duration_s=120.0, session_rate=0.5, think_median_s=10.0)


def test_shared_prefix_deterministic_by_seed() -> None:
    a = shared_prefix(SharedPrefixConfig(groups=4, prompts_per_group=5, seed=3))
    b = shared_prefix(SharedPrefixConfig(groups=4, prompts_per_group=5, seed=3))
    c = shared_prefix(SharedPrefixConfig(groups=4, prompts_per_group=5, seed=4))
    assert a == b and a != c


def test_shared_prefix_groups_share_their_system_prompt_blocks() -> None:
    t = shared_prefix(SMALL_SP)
    assert len(t.requests) == 60
    sys_blocks = 2000 // 512  # whole blocks of the system prompt; block 3 mixes in the question
    by_prefix: dict[tuple[int, ...], int] = defaultdict(int)
    for r in t.requests:
        assert r.input_length == 2100 and len(r.hash_ids) == math.ceil(2100 / 512)
        assert r.output_length == 256
        by_prefix[r.hash_ids[:sys_blocks]] += 1
    assert sorted(by_prefix.values()) == [10] * 6  # six groups of ten
    tails = [r.hash_ids[sys_blocks:] for r in t.requests]
    assert len(set(tails)) == 60  # every question is new content
    expected = (9 / 10) * (sys_blocks * 512) / 2100  # all but each group's first request hit
    assert ideal_hit_ratio(t) == pytest.approx(expected)
    times = [r.timestamp for r in t.requests]
    assert times == sorted(times) and times[0] == 0.0
    assert 60 / 5.0 / 3 < t.duration() < 60 / 5.0 * 3  # Poisson at 5 req/s


def _sessions(reqs: tuple[TraceRequest, ...]) -> dict[str, list[TraceRequest]]:
    out: dict[str, list[TraceRequest]] = defaultdict(list)
    for r in reqs:
        assert r.session is not None
        out[r.session].append(r)
    return out


def test_multi_turn_deterministic_by_seed() -> None:
    assert multi_turn(SMALL_MT) == multi_turn(SMALL_MT)
    other = MultiTurnConfig(duration_s=120.0, session_rate=0.5, think_median_s=10.0, seed=1)
    assert multi_turn(other) != multi_turn(SMALL_MT)


def test_multi_turn_each_turn_extends_the_previous_chain() -> None:
    t = multi_turn(SMALL_MT)
    bs = t.block_size
    sessions = _sessions(t.requests)
    assert len(sessions) > 20 and any(len(turns) >= 3 for turns in sessions.values())
    partial_extended = 0
    for turns in sessions.values():
        for prev, cur in itertools.pairwise(turns):
            assert cur.timestamp > prev.timestamp
            # previous prompt + its answer + a new user message (at least one token)
            assert cur.input_length > prev.input_length + prev.output_length
            full = prev.input_length // bs
            assert cur.hash_ids[:full] == prev.hash_ids[:full]
            if prev.input_length % bs:
                # the partial last block gained tokens: its content changed, so its id must
                assert cur.hash_ids[full] != prev.hash_ids[full]
                assert cur.hash_ids[full] not in prev.hash_ids
                partial_extended += 1
    assert partial_extended > 10
    for r in t.requests:
        assert len(r.hash_ids) == math.ceil(r.input_length / bs)
        assert r.hash_ids[:4] == t.requests[0].hash_ids[:4]  # 2048-token shared system prompt
        assert 0 <= r.timestamp < SMALL_MT.duration_s
    assert ideal_hit_ratio(t) > 0.6


def test_default_traces_are_ten_minutes_and_reward_pool_sized_caches() -> None:
    """Defaults fit an 8 x 409,600-token pool but not one GPU, so routing matters."""
    for trace in (shared_prefix(SharedPrefixConfig()), multi_turn(MultiTurnConfig())):
        assert 540 < trace.duration() < 660
        ideal = ideal_hit_ratio(trace)
        assert ideal > 0.75
        one_gpu = lru_hit_ratio(trace, 409_600)
        pool = lru_hit_ratio(trace, 8 * 409_600)
        assert one_gpu < 0.8 * ideal and pool > 0.95 * ideal


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="groups must be positive"):
        SharedPrefixConfig(groups=0)
    with pytest.raises(ValueError, match="request_rate must be positive"):
        SharedPrefixConfig(request_rate=float("inf"))
    with pytest.raises(ValueError, match="turns_mean"):
        MultiTurnConfig(turns_mean=0.5)


def test_cli_writes_mooncake_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mt.jsonl"
    args = ["gen-trace", "--kind", "multi-turn", "--duration", "60", "--session-rate", "0.5"]
    assert main([*args, "--seed", "5", "--out", str(out)]) == 0
    assert "ideal hit ratio" in capsys.readouterr().out
    again = tmp_path / "mt2.jsonl"
    assert main([*args, "--seed", "5", "--out", str(again)]) == 0
    assert out.read_bytes() == again.read_bytes()
    loaded = load_trace(out)
    direct = multi_turn(MultiTurnConfig(duration_s=60, session_rate=0.5, seed=5))
    assert loaded.requests == direct.requests


def test_cli_shared_prefix_options(tmp_path: Path) -> None:
    out = tmp_path / "sp.jsonl"
    argv = ["gen-trace", "--kind", "shared-prefix", "--groups", "3", "--prompts-per-group", "4"]
    argv += ["--system-prompt-len", "1024", "--question-len", "10", "--output-len", "7"]
    assert main([*argv, "--out", str(out)]) == 0
    t = load_trace(out)
    assert len(t.requests) == 12
    assert {r.input_length for r in t.requests} == {1034}
    assert {r.output_length for r in t.requests} == {7}
    assert len({r.hash_ids[:2] for r in t.requests}) == 3


def test_cli_bad_option_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.jsonl"
    assert main(["gen-trace", "--kind", "shared-prefix", "--groups", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "groups must be positive" in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_mtbench_chat_reproduces_the_shipped_example(tmp_path: Path) -> None:
    out = tmp_path / "chat.jsonl"
    assert main(["gen-trace", "--kind", "mtbench-chat", "--out", str(out)]) == 0
    assert out.read_bytes() == bundled("mtbench-chat").read_bytes()
