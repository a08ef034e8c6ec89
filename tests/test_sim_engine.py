"""The simulated engine against its model: every expectation is computed from the profile."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.sim.api import Aborted, EngineEvent, Finished, FirstToken, SimRequest
from backends.sim.engine import Engine, EngineConfig
from backends.sim.kvevents import BlockStored
from backends.sim.perf import Profile, get_profile

H100 = get_profile("llama3-8b-h100")
HICACHE = get_profile("llama3-8b-h100-hicache")
BS = 16


def req(rid: str, prefix: list[int], n: int, out: int, bs: int = BS) -> SimRequest:
    """A request whose first units are `prefix` (shared ids), then units unique to `rid`."""
    k = -(-n // bs)
    blocks = [*prefix[:k]]
    blocks += [hash((rid, i)) for i in range(len(blocks), k)]
    return SimRequest(
        rid=rid, blocks=tuple(blocks), block_size=bs, prompt_tokens=n, output_tokens=out
    )


def drain(engine: Engine) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    while (t := engine.next_event_time()) is not None:
        events += engine.advance(t)
    return events


def run(
    engine: Engine,
    arrivals: list[tuple[float, SimRequest]],
    aborts: list[tuple[float, str]] = (),  # type: ignore[assignment]
) -> list[EngineEvent]:
    """Feed arrivals and aborts in time order, advancing to each; then run dry."""
    actions = [(t, 0, r) for t, r in arrivals] + [(t, 1, rid) for t, rid in aborts]
    actions.sort(key=lambda a: (a[0], a[1]))
    events: list[EngineEvent] = []
    for t, kind, what in actions:
        events += engine.advance(t)
        if kind == 0:
            assert isinstance(what, SimRequest)
            engine.add_request(what, t)
        else:
            assert isinstance(what, str)
            engine.abort(what, t)
    return events + drain(engine)


def by_rid(events: list[EngineEvent], kind: type) -> dict[str, EngineEvent]:
    return {e.rid: e for e in events if isinstance(e, kind)}


def held(engine: Engine, r: SimRequest) -> int:
    """Tokens of r's prompt on the device (no n - 1 cap: probe a longer prompt)."""
    units = [*r.blocks, -1]
    return engine.cache.match(units, [r.unit_tokens(i) for i in range(len(r.blocks))] + [1]).tokens


def decode_time(p: Profile, kv_start: int, steps: int) -> float:
    """`steps` decode steps of a lone sequence whose KV starts at `kv_start`, one at a time."""
    return sum(p.decode_step_time(1, kv_start + j) for j in range(steps))


def test_lone_request_ttft_and_e2e_follow_the_profile() -> None:
    e = Engine(H100)
    n, out = 2000, 50
    events = run(e, [(1.0, req("a", [], n, out))])
    ft = by_rid(events, FirstToken)["a"]
    fin = by_rid(events, Finished)["a"]
    assert isinstance(ft, FirstToken) and isinstance(fin, Finished)
    assert ft.time - 1.0 == pytest.approx(H100.step_overhead_s + H100.prefill_time(n, n))
    assert ft.cached_tokens == 0
    # after the first token, out - 1 decode steps; KV = prompt + tokens so far
    assert fin.time - ft.time == pytest.approx(decode_time(H100, n + 1, out - 1), rel=1e-9)
    assert fin.output_tokens == out and fin.first_token_time == ft.time
    assert e.load().kv_used_tokens == 0 and e.load().running == 0
    e.check()


def test_long_prompt_is_prefilled_in_chunks() -> None:
    e = Engine(H100)
    n = 20_000  # chunks of 8192, 8192, 3616
    events = run(e, [(0.0, req("a", [], n, 1))])
    ft = by_rid(events, FirstToken)["a"]
    chunks = [(8192, 8192), (8192, 16384), (3616, 20000)]
    expected = sum(H100.step_overhead_s + H100.prefill_time(c, ctx) for c, ctx in chunks)
    assert ft.time == pytest.approx(expected)
    assert isinstance(by_rid(events, Finished)["a"], Finished)


def test_cached_prefix_cuts_ttft_by_the_modelled_amount() -> None:
    e = Engine(H100)
    shared = list(range(1000, 1100))
    first = req("a", shared, 1600, 2)
    second = req("b", shared, 2400, 2)  # shares a's 100 units = 1600 tokens... capped below
    events = run(e, [(0.0, first), (5.0, second)])
    ft = by_rid(events, FirstToken)["b"]
    assert isinstance(ft, FirstToken)
    assert ft.cached_tokens == 1600
    uncached = 2400 - 1600
    expected = H100.step_overhead_s + H100.prefill_time(uncached, 2400)
    assert ft.time - 5.0 == pytest.approx(expected)
    assert expected < H100.step_overhead_s + H100.prefill_time(2400, 2400)
    # the same prompt again: whole prompt cached, but the last unit is recomputed (n - 1 cap)
    again = req("b2", [*second.blocks], 2400, 1)
    e.add_request(again, 10.0)
    ft2 = by_rid(drain(e), FirstToken)["b2"]
    assert isinstance(ft2, FirstToken)
    assert ft2.cached_tokens == 2400 - BS
    assert ft2.time - 10.0 == pytest.approx(H100.step_overhead_s + H100.prefill_time(BS, 2400))


def test_eviction_removes_lru_unlocked_leaves_only() -> None:
    small = dataclasses.replace(H100, kv_capacity_tokens=1000)
    e = Engine(small)
    old = req("old", [1, 2, 3, 4, 5], 80, 1)
    newer = req("newer", [11, 12, 13, 14, 15], 80, 1)
    runner = req("run", [21, 22, 23, 24, 25], 80, 400)  # still decoding when "big" comes
    events: list[EngineEvent] = []
    for t, r in ((0.0, old), (1.0, newer), (2.0, runner)):
        events += e.advance(t)
        e.add_request(r, t)
    events += e.advance(2.1)
    assert "old" in by_rid(events, Finished) and "run" in by_rid(events, FirstToken)
    assert e.probe(old).device_tokens == 80 - BS  # n - 1 cap: last unit recomputed
    # used: 3 x 80 in the tree + 400 reserved for the runner's output; 360 free.
    # "big" needs 501: 141 must go. LRU: all of old (80), then newer's leaves (64 of 80).
    e.add_request(req("big", [], 500, 1), 2.1)
    assert held(e, old) == 80  # admitted at the next step boundary, not before
    e.advance(2.2)
    assert held(e, old) == 0
    assert held(e, newer) == BS  # only its first unit is left
    assert e.probe(runner).device_tokens == 80 - BS  # locked by its running request: kept
    e.check()
    drain(e)
    e.check()
    assert e.load().kv_used_tokens == 0


def test_decode_step_time_grows_with_batch_kv() -> None:
    short = Engine(H100)
    lone = run(short, [(0.0, req("a", [], 100, 200))])
    crowded = Engine(H100)
    events = run(crowded, [(0.0, req("a", [], 100, 200)), (0.0, req("big", [], 60_000, 400))])
    ft, fin = by_rid(lone, FirstToken)["a"], by_rid(lone, Finished)["a"]
    ft2, fin2 = by_rid(events, FirstToken)["a"], by_rid(events, Finished)["a"]
    lone_tpot = (fin.time - ft.time) / 199
    crowded_tpot = (fin2.time - ft2.time) / 199
    assert crowded_tpot > 1.2 * lone_tpot
    # and the closed-form jump equals the step-by-step sum
    assert fin.time - ft.time == pytest.approx(decode_time(H100, 101, 199), rel=1e-9)


def test_batch_kv_counts_the_tokens_written_inside_a_decode_segment() -> None:
    e = Engine(H100)
    e.add_request(req("a", [], 1000, 400), 0.0)
    e.add_request(req("b", [], 3000, 400), 0.0)
    assert e.batch_kv_tokens() == 0  # nothing decoding yet
    e.advance(0.5)  # both prefilled; a long decode segment runs to their finish
    a, b = e.progress("a", 0.5), e.progress("b", 0.5)
    assert 1 < b <= a < 400  # b joined a step later (a's step was under way when it came)
    assert e.batch_kv_tokens() == 1000 + a + 3000 + b
    assert e.load().kv_used_tokens == 4000 + 2 * 400  # the whole outputs stay reserved


def test_chunked_prefill_lets_running_decodes_progress() -> None:
    e = Engine(H100)
    e.add_request(req("a", [], 100, 5000), 0.0)
    e.advance(0.5)
    before = e.progress("a", 0.5)
    assert before > 1
    n_long = 100_000  # 13 chunks of <= 8192
    e.add_request(req("long", [], n_long, 1), 0.5)
    events: list[EngineEvent] = []
    t = 0.5
    seen = []
    while "long" not in by_rid(events, FirstToken):
        t += 0.25
        events += e.advance(t)
        seen.append(e.progress("a", t))
    ft = by_rid(events, FirstToken)["long"]
    at_ft = e.progress("a", ft.time)
    # one token per mixed step: it kept streaming during the whole prefill
    assert at_ft - before >= -(-n_long // 8192)
    assert before < seen[len(seen) // 2] < at_ft  # moving in the middle of the prefill
    # the long prefill did not run alone: decode time was added to each of its steps
    assert ft.time - 0.5 > sum(
        H100.step_overhead_s + H100.prefill_time(min(8192, n_long - i), min(i + 8192, n_long))
        for i in range(0, n_long, 8192)
    )


def test_host_tier_hit_loads_faster_than_recompute() -> None:
    small = dataclasses.replace(HICACHE, kv_capacity_tokens=3000, host_capacity_tokens=12_000)
    nohost = dataclasses.replace(H100, kv_capacity_tokens=3000)
    prompt = list(range(500, 600))
    results = {}
    for name, prof in (("host", small), ("recompute", nohost)):
        e = Engine(prof)
        arrivals = [(0.0, req("p", prompt, 1600, 1))]
        # fill the device pool with other prompts so p's units leave it
        arrivals += [(1.0 + i, req(f"f{i}", [], 2000, 1)) for i in range(3)]
        arrivals += [(10.0, req("q", prompt, 2000, 1))]
        events = run(e, arrivals)
        results[name] = by_rid(events, FirstToken)["q"]
        e.check()
    hit, miss = results["host"], results["recompute"]
    assert isinstance(hit, FirstToken) and isinstance(miss, FirstToken)
    assert hit.host_loaded_tokens == 1600 and hit.cached_tokens == 1600
    assert miss.cached_tokens == 0
    expected = small.step_overhead_s + small.host_load_time(1600) + small.prefill_time(400, 2000)
    assert hit.time - 10.0 == pytest.approx(expected)
    assert hit.time < miss.time


def test_lpm_admits_longest_cached_prefix_first() -> None:
    order = {}
    for policy in ("fcfs", "lpm"):
        cfg = EngineConfig(schedule_policy=policy, max_running_requests=2)
        e = Engine(H100, cfg)
        warm = list(range(9000, 9100))
        events = run(e, [(0.0, req("warm", warm, 1600, 1))])
        e.add_request(req("busy", [], 4000, 300), 1.0)  # holds one of the two slots
        e.add_request(req("cold", [], 1600, 1), 1.001)
        e.add_request(req("hot", warm, 1600, 1), 1.002)
        events = drain(e)
        firsts = [ev.rid for ev in events if isinstance(ev, FirstToken)]
        order[policy] = [r for r in firsts if r in ("cold", "hot")]
    assert order["fcfs"] == ["cold", "hot"]
    assert order["lpm"] == ["hot", "cold"]


def test_priority_scheduling_orders_the_queue_by_priority_then_arrival_as_sglang() -> None:
    def admitted(enable: bool) -> list[str]:
        e = Engine(H100, EngineConfig(max_running_requests=1, enable_priority_scheduling=enable))
        e.add_request(req("busy", [], 1000, 50), 0.0)  # holds the one running slot
        for t, (rid, priority) in enumerate((("none", None), ("low", 0), ("high", 3), ("mid", 1))):
            e.add_request(dataclasses.replace(req(rid, [], 500, 1), priority=priority), 0.001 * t)
        events = drain(e)
        return [ev.rid for ev in events if isinstance(ev, FirstToken) and ev.rid != "busy"]

    # Higher first, ties by arrival; no priority is the lowest (SGLang: -sys.maxsize - 1).
    assert admitted(True) == ["high", "mid", "low", "none"]
    assert admitted(False) == ["none", "low", "high", "mid"]  # off (SGLang's default): FCFS
    with pytest.raises(ValueError, match="fcfs"):
        EngineConfig(schedule_policy="lpm", enable_priority_scheduling=True)


def test_abort_frees_resources_in_every_phase() -> None:
    e = Engine(H100, EngineConfig(max_running_requests=1))
    e.add_request(req("decoding", [], 500, 10_000), 0.0)
    e.add_request(req("waiting", [], 500, 10), 0.0)
    e.advance(0.5)
    assert e.load().waiting == 1
    assert e.abort("waiting", 0.5)
    assert e.abort("decoding", 0.6)
    assert not e.abort("decoding", 0.6)  # already over
    assert not e.abort("nobody", 0.6)
    e.add_request(req("prefilling", [], 60_000, 10), 0.7)
    e.advance(0.8)
    assert e.abort("prefilling", 0.8)
    events = e.advance(0.8) + drain(e)
    e.check()
    assert e.load().kv_used_tokens == 0 and e.load().running == 0 and e.load().waiting == 0
    assert e.cache.protected_tokens == 0 and e.cache.reserved_tokens == 0
    assert not any(isinstance(ev, Finished) for ev in events)
    # and the engine still serves
    after = run(e, [(2.0, req("next", [], 100, 3))])
    assert "next" in by_rid(after, Finished)


def test_small_steps_equal_one_big_jump() -> None:
    def workload() -> list[tuple[float, SimRequest]]:
        shared = list(range(7000, 7200))
        return [
            (0.05 * i, req(f"r{i}", shared[: (i % 5) * 20], 300 + 977 * (i % 11), 1 + 37 * (i % 7)))
            for i in range(60)
        ]

    aborts = [(0.7, "r9"), (1.3, "r20")]
    big = run(Engine(H100), workload(), aborts)
    e = Engine(H100)
    small: list[EngineEvent] = []
    pending = sorted([(t, 0, r) for t, r in workload()] + [(t, 1, r) for t, r in aborts])
    added: list[str] = []
    t = 0.0
    while pending or e.next_event_time() is not None:
        t = min(t + 0.003, pending[0][0]) if pending else t + 0.003
        small += e.advance(t)
        for rid in added[-3:]:  # streaming reads must not disturb anything
            with contextlib.suppress(KeyError):  # KeyError: no longer live
                e.progress(rid, t)
        e.predicted_wait_s(t)
        e.load()
        while pending and pending[0][0] <= t:
            _, _kind, what = pending.pop(0)
            if isinstance(what, SimRequest):
                e.add_request(what, t)
                added.append(what.rid)
            else:
                e.abort(what, t)
    assert len(big) == len(small)
    assert big == small


def test_flush_only_when_idle_and_bad_calls() -> None:
    e = Engine(H100, EngineConfig(enable_kv_events=True))
    e.add_request(req("a", [], 100, 5), 0.0)
    assert not e.flush_cache()
    with pytest.raises(ValueError, match="duplicate"):
        e.add_request(req("a", [], 100, 5), 0.0)
    with pytest.raises(ValueError, match="backwards"):
        e.advance(-1.0)
    drain(e)
    assert any(isinstance(ev, BlockStored) for ev in e.take_kv_events())
    assert e.probe(req("a2", [*req("a", [], 100, 5).blocks], 100, 1)).device_tokens == 96
    assert e.flush_cache()
    assert e.probe(req("a", [], 100, 5)).device_tokens == 0
    huge = req("huge", [], H100.kv_capacity_tokens, 10)
    e.add_request(huge, 5.0)
    assert e.advance(5.0) == [Aborted(rid="huge", time=5.0)]


def test_predicted_wait_tracks_the_queue() -> None:
    e = Engine(H100)
    assert e.predicted_wait_s(0.0) == 0.0
    for i in range(4):
        e.add_request(req(f"q{i}", [], 16_000, 2), 0.0)
    predicted = e.predicted_wait_s(0.0)
    e.add_request(req("probe", [], 100, 1), 0.0)
    ft = by_rid(drain(e), FirstToken)["probe"]
    started = ft.time - (H100.step_overhead_s + H100.prefill_time(100, 100))
    assert predicted == pytest.approx(started, rel=0.25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.floats(0, 3),  # arrival
            st.integers(0, 3),  # shared-prefix group
            st.integers(1, 3000),  # prompt tokens
            st.integers(1, 300),  # output tokens
            st.booleans(),  # aborted later
        ),
        min_size=1,
        max_size=25,
    ),
    st.sampled_from(["fcfs", "lpm"]),
    st.booleans(),
)
def test_random_workloads_lose_no_request(
    spec: list[tuple[float, int, int, int, bool]], policy: Literal["fcfs", "lpm"], host: bool
) -> None:
    prof = dataclasses.replace(
        HICACHE if host else H100, kv_capacity_tokens=8000, host_capacity_tokens=8000 if host else 0
    )
    e = Engine(
        prof,
        EngineConfig(schedule_policy=policy, chunked_prefill_size=512, max_prefill_tokens=1024),
    )
    groups = {g: [hash(("g", g, i)) for i in range(100)] for g in range(4)}
    arrivals = []
    aborts = []
    for i, (t, g, n, out, ab) in enumerate(spec):
        arrivals.append((t, req(f"r{i}", groups[g][: (n // BS) // (g + 1)], n, out)))
        if ab:
            aborts.append((t + 0.05 * (i % 4), f"r{i}"))
    events = run(e, arrivals, aborts)
    times = [ev.time for ev in events]
    assert times == sorted(times)
    arrival = {r.rid: t for t, r in arrivals}
    aborted = {ev.rid for ev in events if isinstance(ev, Aborted)}
    firsts = [ev for ev in events if isinstance(ev, FirstToken)]
    fins = [ev for ev in events if isinstance(ev, Finished)]
    assert len({ev.rid for ev in firsts}) == len(firsts)
    assert len({ev.rid for ev in fins}) == len(fins)
    assert {ev.rid for ev in fins} | aborted == set(arrival)  # every request ends
    assert not {ev.rid for ev in fins} & aborted
    first_at = {ev.rid: ev.time for ev in firsts}
    for ev in fins:
        assert arrival[ev.rid] < first_at[ev.rid] <= ev.time
        assert ev.first_token_time == first_at[ev.rid]
        assert 0 <= ev.cached_tokens < ev.prompt_tokens
    e.check()
    load = e.load()
    assert (load.running, load.waiting, load.kv_used_tokens) == (0, 0, 0)
    assert e.cache.reserved_tokens == 0 and e.cache.protected_tokens == 0


def test_preallocated_room_is_held_then_used_by_its_request() -> None:
    engine = Engine(H100)
    cap = H100.kv_capacity_tokens
    assert engine.preallocate("a", cap - 1000, 0.0)
    assert engine.load().kv_used_tokens == cap - 1000  # held, though nothing runs
    assert not engine.preallocate("b", 2000, 0.0)  # does not fit beside it: nothing held
    assert engine.load().kv_used_tokens == cap - 1000
    with pytest.raises(ValueError):
        engine.preallocate("a", 10, 0.0)  # one hold per request
    engine.check()
    a = req("a", [], cap - 1100, 100)  # prompt + output = what was held
    engine.add_request(a, 0.0)
    engine.check()
    events = drain(engine)
    assert isinstance(by_rid(events, Finished)["a"], Finished)
    engine.check()
    assert engine.cache.reserved_tokens == 0  # the held room went with the request
    assert engine.preallocate("b", 2000, 1e9)  # the finished prompt is evictable cache


def test_an_unused_preallocation_is_released() -> None:
    engine = Engine(H100)
    assert engine.preallocate("a", 5000, 0.0)
    assert engine.release_preallocation("a") and not engine.release_preallocation("a")
    assert engine.cache.reserved_tokens == 0
    # a request that comes with a hold and is aborted while waiting gives it back too
    assert engine.preallocate("b", 5000, 0.0)
    engine.add_request(req("busy", [], 100_000, 10), 0.0)
    engine.add_request(req("b", [], 4000, 1000), 0.0)
    engine.abort("b", 0.0)
    engine.check()
    drain(engine)
    assert engine.cache.reserved_tokens == 0


def test_the_prealloc_queue_is_first_come_first_served() -> None:
    from backends.sim.pd import PreallocQueue

    engine = Engine(H100)
    cap = H100.kv_capacity_tokens
    queue = PreallocQueue(engine)
    assert queue.offer("big", cap - 10_000, 0) and queue.offer("next", 20_000, 0)
    assert queue.offer("small", 100, 0)
    assert not queue.offer("never", cap, 1)  # can never fit: the caller aborts it
    # the head fits; "next" does not, and "small" (which would) waits behind it
    assert queue.pump(0.0) == ["big"] and len(queue) == 2
    queue.cancel("big")  # released unused
    assert queue.pump(0.0) == ["next", "small"] and len(queue) == 0
    queue.cancel("small")
    queue.cancel("next")
    assert engine.cache.reserved_tokens == 0
