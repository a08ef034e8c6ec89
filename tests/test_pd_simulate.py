"""The PD simulator (router/replay/pd_simulate.py, backends/sim/pd.py) and `simulate --pd`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from backends.sim.engine import Engine
from backends.sim.pd import KVLink
from backends.sim.perf import get_profile
from router.cli import main
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.pd_simulate import PDSimConfig, simulate_pd
from router.replay.traces import Trace, TraceRequest

PROFILE = get_profile("llama3-8b-h100")


def _one(prompt: int, output: int) -> Trace:
    blocks = tuple(range(1, -(-prompt // 512) + 1))
    req = TraceRequest(
        index=0, timestamp=0.0, input_length=prompt, output_length=output, hash_ids=blocks
    )
    return Trace(name="one", block_size=512, requests=(req,))


def test_a_lone_request_pays_prefill_transfer_and_one_join_step() -> None:
    run = simulate_pd(_one(4096, 101), "pair", PDSimConfig(prefill=1, decode=1, profile=PROFILE))
    (o,) = run.outcomes
    prefill = PROFILE.step_overhead_s + PROFILE.prefill_time(4096, 4096)
    transfer = 4096 * PROFILE.kv_bytes_per_token() / 40e9  # 13.4 ms at the default link
    join = PROFILE.step_overhead_s  # an idle decode server: the join step reads no batch
    assert o.error is None
    assert o.ttft == pytest.approx(prefill + transfer + join, rel=1e-6)
    # 100 decode steps of a batch of one whose KV grows from 4097 to 4196 tokens
    steps = [PROFILE.decode_step_time(1, 4097 + k) for k in range(100)]
    assert o.tpot == pytest.approx(sum(steps) / 100, rel=1e-6)
    # the TTFT split names the same phases (one request: its mean is the tail's); an empty
    # decode server preallocates at once
    split = run.summary["ttft_split"]
    want = {
        "ttft": o.ttft,
        "room_wait": 0.0,
        "prefill": prefill,
        "transfer": transfer,
        "decode_wait": join,
    }
    for part in ("mean", "slowest_10pct"):
        assert split[part] == pytest.approx(want, rel=1e-6)


def test_the_ttft_split_tail_is_the_slowest_tenth_by_ttft() -> None:
    from router.replay.pd_simulate import ttft_split

    rows = [(float(t), 0.5 * t, 0.1 * t, 0.0, 0.4 * t) for t in range(1, 21)]  # TTFT 1..20 s
    split = ttft_split(rows)
    assert split["mean"]["ttft"] == pytest.approx(10.5)
    assert split["slowest_10pct"] == pytest.approx(
        {"ttft": 19.5, "room_wait": 9.75, "prefill": 1.95, "transfer": 0.0, "decode_wait": 7.8}
    )
    assert ttft_split([]) == {}


def test_a_slower_link_adds_its_transfer_time() -> None:
    fast = simulate_pd(_one(4096, 10), "pair", PDSimConfig(prefill=1, decode=1, profile=PROFILE))
    slow_cfg = PDSimConfig(prefill=1, decode=1, profile=PROFILE, link_bytes_per_s=4e9)
    slow = simulate_pd(_one(4096, 10), "pair", slow_cfg)
    extra = 4096 * PROFILE.kv_bytes_per_token() * (1 / 4e9 - 1 / 40e9)
    assert slow.outcomes[0].ttft == pytest.approx(fast.outcomes[0].ttft + extra, rel=1e-6)  # type: ignore[operator]


def test_link_queues_transfers_in_order() -> None:
    link = KVLink(1e6, 1000)  # 1 ms per token
    assert link.send(10, 0.0) == pytest.approx(0.01)
    assert link.send(10, 0.005) == pytest.approx(0.02)  # waits for the first
    assert link.send(10, 1.0) == pytest.approx(1.01)


@pytest.mark.parametrize("router", ["pair", "cache_aware+power_of_two", "round_robin+least_load"])
def test_every_request_of_a_chat_trace_completes(router: str) -> None:
    trace = multi_turn(MultiTurnConfig(duration_s=60, session_rate=1.0, seed=3))
    run = simulate_pd(trace, router, PDSimConfig(prefill=2, decode=2, profile=PROFILE))
    assert run.summary["failed"] == 0
    assert run.summary["completed"] == len(trace.requests)
    assert all(o.ttft is not None and o.ttft > 0 for o in run.outcomes)
    assert run.summary["hit_ratio"] > 0  # the prefill servers' caches are used
    books = run.stats
    for side in ("prefill", "decode"):
        assert books[side]["in_flight"] == 0
        assert sum(b["routed"] for b in books[side]["backends"].values()) == len(trace.requests)


def test_no_tpot_exceeds_the_step_with_a_full_decode_pool() -> None:
    # one decode server behind two prefill servers, loaded past its KV pool
    trace = multi_turn(MultiTurnConfig(seed=1)).window(240.0, 120.0)
    seen: list[tuple[float, int, int]] = []

    def probe(now: float, engines: Mapping[str, Engine], for_room: Mapping[str, int]) -> None:
        assert set(engines) == set(for_room) == {"d0"}
        seen.append((now, for_room["d0"], engines["d0"].batch_kv_tokens()))

    # no hold in the router: the requests queue at the decode server
    cfg = PDSimConfig(prefill=2, decode=1, profile=PROFILE, load=2.0, room_hold=False)
    run = simulate_pd(trace, "pair", cfg, probe=probe)
    assert run.summary["failed"] == 0
    assert len(seen) == len(trace.requests)  # once per arrival, in time order
    assert [t for t, _, _ in seen] == sorted(t for t, _, _ in seen)
    assert any(waiting for _, waiting, _ in seen)  # requests queued for decode KV room
    assert max(kv for _, _, kv in seen) <= PROFILE.kv_capacity_tokens
    ceiling = PROFILE.decode_step_time(1, PROFILE.kv_capacity_tokens)
    tpots = [o.tpot for o in run.outcomes if o.tpot is not None]
    assert max(tpots) <= ceiling
    assert max(tpots) > 0.9 * ceiling  # and the queued ones run close to it


def test_a_tpot_slo_keeps_every_request_under_it() -> None:
    # the same overloaded decode server; the router holds what would slow its batch past S
    trace = multi_turn(MultiTurnConfig(seed=1)).window(240.0, 120.0)
    slo = 0.9 * PROFILE.decode_step_time(1, PROFILE.kv_capacity_tokens)
    cfg = PDSimConfig(prefill=2, decode=1, profile=PROFILE, load=2.0)
    free = simulate_pd(trace, "pair", cfg)
    bound = simulate_pd(trace, "pair", dataclasses.replace(cfg, tpot_slo_s=slo))
    assert free.summary["failed"] == bound.summary["failed"] == 0
    assert max(o.tpot for o in free.outcomes if o.tpot is not None) > slo
    assert max(o.tpot for o in bound.outcomes if o.tpot is not None) <= slo
    assert bound.summary["ttft_p90"] > free.summary["ttft_p90"]  # the wait moved to TTFT


def test_pair_keeps_conversations_on_their_prefill_server() -> None:
    # a one-block system prompt: the hits come from each conversation's own history
    trace = multi_turn(
        MultiTurnConfig(duration_s=120, session_rate=1.0, system_prompt_len=512, seed=3)
    )
    cfg = PDSimConfig(prefill=4, decode=2, profile=PROFILE)
    pair = simulate_pd(trace, "pair", cfg).summary
    scattered = simulate_pd(trace, "round_robin+round_robin", cfg).summary
    assert pair["hit_ratio"] > scattered["hit_ratio"] + 0.08  # 0.50 against 0.39


def test_simulate_pd_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pd.json"
    code = main(
        [
            "simulate",
            "--trace",
            "conversation",
            "--duration",
            "60",
            "--pd",
            "2:2",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["pd"] == {"prefill": 2, "decode": 2}
    assert set(doc["results"]) == {"pair", "cache_aware+power_of_two"}
    assert "p90 TPOT" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pd", "4"], "PREFILL:DECODE"),
        (["--pd", "0:2"], "PREFILL:DECODE"),
        (["--pd", "2:2", "--policies", "pair,nope+cost"], "PD router"),
        (["--pd", "2:2", "--link-gbps", "0"], "--link-gbps"),
        (["--pd", "2:2", "--slo-tpot", "-1"], "--slo-tpot"),
        (["--slo-tpot", "0.02"], "--slo-tpot applies to PD pools"),
    ],
)
def test_simulate_pd_cli_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--trace", "conversation", "--duration", "10", "--quiet", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def _two(first_output: int, second_output: int) -> Trace:
    reqs = tuple(
        TraceRequest(
            index=i,
            timestamp=0.001 * i,
            input_length=4096,
            output_length=out,
            hash_ids=tuple(range(100 * i + 1, 100 * i + 9)),
        )
        for i, out in enumerate((first_output, second_output))
    )
    return Trace(name="two", block_size=512, requests=reqs)


@pytest.mark.parametrize("hold", [False, True])
def test_a_prefill_starts_only_once_its_decode_room_is_held(hold: bool) -> None:
    # the first request's output fills most of the decode pool; the second waits for its
    # room before its prefill may start (in the decode server's queue, or held in the router)
    cap = PROFILE.kv_capacity_tokens
    trace = _two(cap - 4096 - 1000, 5000)
    cfg = PDSimConfig(prefill=1, decode=1, profile=PROFILE, room_hold=hold)
    run = simulate_pd(trace, "pair", cfg)
    first, second = run.outcomes
    assert first.error is None and second.error is None
    assert first.e2e is not None and second.ttft is not None
    prefill = PROFILE.step_overhead_s + PROFILE.prefill_time(4096, 4096)
    transfer = 4096 * PROFILE.kv_bytes_per_token() / 40e9
    room_wait = first.e2e - 0.001  # until the first one finished
    # then its own prefill (the prefill server idle by then), transfer and a join step
    assert second.ttft == pytest.approx(room_wait + prefill + transfer + PROFILE.step_overhead_s)
    split = run.summary["ttft_split"]["slowest_10pct"]  # the second request alone
    assert split["room_wait"] == pytest.approx(room_wait)
    assert run.stats["held_for_decode_room"] == 0
