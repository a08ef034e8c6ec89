"""analyze: hand-computed hit ratios and reuse gaps, a tree-LRU cross-check, the CLI, and the
figures the issue asks for on the shipped Mooncake conversation trace."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from router.cli import main
from router.replay.analyze import (
    analyze,
    default_cache_sizes,
    ideal_cached_tokens,
    ideal_hit_ratio,
    lru_cached_tokens,
    lru_curve,
    lru_hit_ratio,
)
from router.replay.traces import Trace, TraceRequest, bundled, load_trace, write_mooncake


def _tiny() -> Trace:
    """Block size 4. Requests (time, ids, prompt tokens):
    r0 t=0 (1,2) 8 | r1 t=1 (1,2,3) 10 | r2 t=3 (1,5) 6 | r3 t=6 (1,2) 7
    """
    spec = [(0.0, (1, 2), 8), (1.0, (1, 2, 3), 10), (3.0, (1, 5), 6), (6.0, (1, 2), 7)]
    reqs = tuple(
        TraceRequest(index=i, timestamp=t, input_length=n, output_length=1, hash_ids=ids)
        for i, (t, ids, n) in enumerate(spec)
    )
    return Trace(name="tiny", block_size=4, requests=reqs)


def test_ideal_hit_ratio_by_hand() -> None:
    # hits: r0 0; r1 blocks 1,2 = 8; r2 block 1 = 4; r3 blocks 1,2 = 8 capped at 7 tokens
    assert ideal_hit_ratio(_tiny()) == pytest.approx(19 / 31)


@pytest.mark.parametrize(
    ("cache_tokens", "expected"),
    [
        # 3 blocks: r2's insert of 5 evicts leaf 3 only; nothing else is lost
        (12, 19 / 31),
        # 2 blocks: r1's new leaf 3 is evicted at once; r2 evicts 2, so r3 hits only block 1
        (8, (8 + 4 + 4) / 31),
        (11, (8 + 4 + 4) / 31),  # whole blocks only: 11 tokens hold 2 blocks
        # 1 block: only the shared root 1 survives
        (4, (4 + 4 + 4) / 31),
        (3, 0.0),
    ],
)
def test_lru_hit_ratio_by_hand(cache_tokens: int, expected: float) -> None:
    assert lru_hit_ratio(_tiny(), cache_tokens) == pytest.approx(expected)


def test_cached_tokens_per_request_by_hand() -> None:
    # the per-request figures behind the two ratios above (benchmarks/ttft_floor.py uses them)
    assert ideal_cached_tokens(_tiny()) == [0, 8, 4, 7]
    assert lru_cached_tokens(_tiny(), 8) == [0, 8, 4, 4]
    with pytest.raises(ValueError):
        lru_cached_tokens(_tiny(), -1)


def test_reuse_gaps_by_hand() -> None:
    rep = analyze(_tiny(), [8])
    # reused blocks: r1 {1,2} from t=0; r2 {1} from t=1; r3 {1} from t=3, {2} from t=1
    assert rep.reused_blocks == 5
    g = rep.reuse_gap_s  # [1, 1, 2, 3, 5]
    assert (g.p10, g.p50, g.p90) == pytest.approx((1.0, 2.0, 4.2))
    # tokens inserted in between: only r2's block 5 (2 tokens) lies between r1 and r3 for block 2
    gt = rep.reuse_gap_tokens  # [0, 0, 0, 0, 2]
    assert (gt.p10, gt.p50, gt.p90) == pytest.approx((0.0, 0.0, 1.2))
    assert rep.requests == 4 and rep.duration_s == 6.0
    assert rep.input_tokens.max == 10 and rep.input_tokens.mean == pytest.approx(31 / 4)
    assert [p.cache_tokens for p in rep.lru_bound] == [8]


def _tree_lru(trace: Trace, cache_tokens: int) -> float:
    """Reference: an explicit radix tree of blocks evicting the least recently used leaf."""
    cap = cache_tokens // trace.block_size
    parent: dict[int, int | None] = {}
    children: dict[int, set[int]] = {}
    used: dict[int, int] = {}
    hit = total = 0
    for step, r in enumerate(trace.requests):
        h = 0
        for b in r.hash_ids:
            if b not in used:
                break
            h += 1
        hit += min(h * trace.block_size, r.input_length)
        total += r.input_length
        prev: int | None = None
        for b in r.hash_ids:
            if b not in used:
                parent[b] = prev
                children[b] = set()
                if prev is not None:
                    children[prev].add(b)
            used[b] = step
            prev = b
        while len(used) > cap:
            # unique: only the last block of the latest request's path can share its step
            leaf = min((b for b in used if not children[b]), key=used.__getitem__)
            del used[leaf]
            p = parent.pop(leaf)
            del children[leaf]
            if p is not None:
                children[p].discard(leaf)
    return hit / total


def _random_tree_trace(seed: int) -> Trace:
    """Requests that walk a random prefix tree: chained ids, shared and diverging branches."""
    rng = random.Random(seed)
    paths: list[tuple[int, ...]] = [()]
    next_id = 0
    reqs = []
    for i in range(120):
        base = rng.choice(paths)
        base = base[: rng.randint(0, len(base))]
        grown = list(base)
        for _ in range(rng.randint(1 if not base else 0, 4)):
            grown.append(next_id)
            next_id += 1
        ids = tuple(grown)
        paths.append(ids)
        n = len(ids) * 4 - rng.randint(0, 3)
        reqs.append(
            TraceRequest(index=i, timestamp=float(i), input_length=n, output_length=1, hash_ids=ids)
        )
    return Trace(name="tree", block_size=4, requests=tuple(reqs))


@pytest.mark.parametrize("seed", range(5))
def test_lru_matches_explicit_tree_lru(seed: int) -> None:
    trace = _random_tree_trace(seed)
    for cap in (0, 4, 12, 40, 100, 400):
        assert lru_hit_ratio(trace, cap) == pytest.approx(_tree_lru(trace, cap)), cap


def test_lru_bound_monotone_and_reaches_ideal() -> None:
    trace = _random_tree_trace(7)
    curve = lru_curve(trace, [400, 4, 40, 12, 100, 10_000])
    ratios = [p.hit_ratio for p in curve]
    assert [p.cache_tokens for p in curve] == [4, 12, 40, 100, 400, 10_000]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    assert ratios[-1] == pytest.approx(ideal_hit_ratio(trace))


def test_default_sizes_are_log_spaced_and_include_eight_gpus() -> None:
    sizes = default_cache_sizes()
    assert 3_276_800 in sizes and 409_600 in sizes
    assert all(b == 2 * a for a, b in itertools.pairwise(sizes))


def test_cli_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace_path = tmp_path / "tiny.jsonl"
    write_mooncake(_tiny(), trace_path)
    out = tmp_path / "a.json"
    argv = ["analyze", "--trace", str(trace_path), "--block-size", "4"]
    code = main([*argv, "--cache-tokens", "12,8", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "ideal hit ratio  0.6129" in table and "LRU bound" in table
    data = json.loads(out.read_text())
    assert data["requests"] == 4 and data["duration_s"] == 6.0
    assert data["ideal_hit_ratio"] == pytest.approx(19 / 31)
    assert data["reuse_gap_s"] == pytest.approx({"p10": 1.0, "p50": 2.0, "p90": 4.2})
    assert set(data["reuse_gap_tokens"]) == {"p10", "p50", "p90"}
    assert data["lru_bound"] == [
        {"cache_tokens": 8, "hit_ratio": pytest.approx(16 / 31)},
        {"cache_tokens": 12, "hit_ratio": pytest.approx(19 / 31)},
    ]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--trace", "no-such-trace"], "no trace file or bundled trace 'no-such-trace'"),
        (["--trace", "azure-code", "--cache-tokens", "1,x"], "--cache-tokens must be integers"),
        (["--trace", "azure-code", "--cache-tokens", "0"], "positive"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    args: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["analyze", *args]) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1


def test_cli_malformed_trace_names_line_in_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0]}\n{\n')
    proc = subprocess.run(
        [sys.executable, "-m", "router", "analyze", "--trace", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"{bad}:2: invalid JSON" in proc.stderr and proc.stderr.count("\n") == 1


def test_conversation_trace_ideal_and_lru_bound() -> None:
    """The issue's figures: ideal ~0.37; ~0.15 at 6,400 blocks of 512; growing with size."""
    trace = load_trace(bundled("conversation"))
    assert ideal_hit_ratio(trace) == pytest.approx(0.3736, abs=0.001)
    curve = lru_curve(trace, [819_200, 3_276_800, 13_107_200])
    ratios = [p.hit_ratio for p in curve]
    assert ratios[1] == pytest.approx(0.15, abs=0.01)
    assert ratios[0] < ratios[1] < ratios[2] < 0.3737


def test_ttft_floor_benchmark_prices_uncached_chunks_on_an_idle_backend(tmp_path: Path) -> None:
    from backends.sim.perf import get_profile

    # one 20,000-token prompt three times: the repeats are cached but for their last token
    trace = Trace(
        name="twice",
        block_size=512,
        requests=tuple(
            TraceRequest(
                index=i,
                timestamp=float(i),
                input_length=20_000,
                output_length=1,
                hash_ids=tuple(range(40)),
            )
            for i in range(3)
        ),
    )
    path = tmp_path / "twice.jsonl"
    write_mooncake(trace, path)
    out = tmp_path / "floor.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/ttft_floor.py",
            "--trace",
            str(path),
            "--profile",
            "llama3-8b-h100",
            "--chunk",
            "8192",
            "--target",
            "0.5",
            "--json",
            str(out),
            "--policies",
            "round_robin,cost",
        ],
        check=True,
        capture_output=True,
        cwd=Path(__file__).parent.parent,
    )
    floors = json.loads(out.read_text())["floors"]
    prof = get_profile("llama3-8b-h100")
    miss = sum(  # chunks of 8192, 8192, 3616, each with the step overhead
        prof.step_overhead_s + prof.prefill_time(c, done)
        for c, done in ((8192, 8192), (8192, 16384), (3616, 20000))
    )
    hit = prof.step_overhead_s + prof.prefill_time(1, 20000)
    assert floors["no_cache"]["p50_s"] == pytest.approx(miss)
    assert floors["no_cache"]["share_above_target"] == 1.0
    # infinite cache: [hit, hit, miss]
    assert floors["infinite"]["p50_s"] == pytest.approx(hit)
    assert floors["infinite"]["p90_s"] == pytest.approx(miss)
    assert floors["infinite"]["share_above_target"] == pytest.approx(1 / 3)
    # simulated: round_robin puts the three on three idle backends, so all three recompute the
    # prompt; each is over the target, and by its own floor (nothing avoidable)
    run = json.loads(out.read_text())["runs"]["round_robin"]
    assert run["failed"] == 0 and run["hit_ratio"] == 0.0
    assert run["share_above_target"] == run["share_above_target_by_floor"] == 1.0
    assert run["share_above_target_avoidable"] == 0.0
    assert "share_avoidable_predicted_over" not in run  # round_robin predicts no TTFT
    # cost sends the repeats where the prompt is cached: only the first is over, by its floor
    run = json.loads(out.read_text())["runs"]["cost"]
    assert run["share_above_target"] == run["share_above_target_by_floor"] == pytest.approx(1 / 3)
    assert run["share_avoidable_predicted_over"] == run["share_avoidable_predicted_under_late"] == 0
