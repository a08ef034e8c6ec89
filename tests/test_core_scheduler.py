"""The router-side scheduler: late binding, order, coalescing, admission, priorities, fairness.

Backends run a 10k tokens/s prior with no attention or decode terms, so predicted queues are
hand-computable: a 4000-token prompt is 0.4 s of prefill.
"""

from __future__ import annotations

import pytest

from router.core.model import BackendSpec, PerfPrior, RouteRequest
from router.core.policies import make_policy
from router.core.routing import RoutingCore
from router.core.scheduler import (
    DEFAULT_PP,
    Scheduler,
    SchedulerConfig,
    Ticket,
    retry_after_header,
)
from router.replay.gentrace import SharedPrefixConfig, shared_prefix
from router.replay.simulate import SimConfig, capacity_p90, simulate_policy

PRIOR = PerfPrior(
    prefill_tokens_per_s=10_000.0,
    prefill_s_per_token_ctx=0.0,
    decode_step_s=0.01,
    decode_s_per_kv_token=0.0,
)


def _sched(
    backends: int = 1, policy: str = "cost", max_running: int | None = None, **config: object
) -> Scheduler:
    specs = [
        BackendSpec(
            id=f"b{i}", kv_capacity_tokens=1_000_000, prior=PRIOR, max_running_requests=max_running
        )
        for i in range(backends)
    ]
    options = {"calibrate": False, "interference": 0.0} if policy == "cost" else {}
    core = RoutingCore(make_policy(policy, **options), specs)
    return Scheduler(core, SchedulerConfig(**config))  # type: ignore[arg-type]


_next_block = iter(range(1_000_000, 10_000_000, 100))


def _ticket(
    rid: str,
    prompt: int,
    arrival: float = 0.0,
    *,
    blocks: tuple[int, ...] | None = None,
    priority: int = 0,
    tenant: str = "",
    deadline: float | None = None,
) -> Ticket:
    if blocks is None:  # a prompt sharing nothing with any other
        start = next(_next_block)
        blocks = tuple(range(start, start + -(-prompt // 1000)))
    req = RouteRequest(
        rid=rid, blocks=blocks, block_tokens=1000, prompt_tokens=prompt, max_tokens=10
    )
    return Ticket(req=req, arrival=arrival, priority=priority, tenant=tenant, deadline_s=deadline)


def _bound(s: Scheduler, now: float) -> list[str]:
    return [b.ticket.req.rid for b in s.step(now).bound]


def test_a_backend_past_its_budget_takes_nothing_more_until_its_queue_drains() -> None:
    s = _sched(budget_s=0.5)
    for i in range(3):
        assert s.submit(_ticket(f"r{i}", 4000), 0.0) is None
    out = s.step(0.0)
    # r0 binds (queue 0 < 0.5); then the queue is 0.4 s, still under: r1 binds; 0.8 s: r2 waits.
    assert [b.ticket.req.rid for b in out.bound] == ["r0", "r1"]
    assert len(s) == 1
    # The queue burns at 1 s/s: it falls under the budget at 0.8 - 0.5 = 0.3 s.
    assert out.wake_at == pytest.approx(0.3)
    assert _bound(s, 0.2) == []
    bound = s.step(0.31).bound
    assert [b.ticket.req.rid for b in bound] == ["r2"]
    assert bound[0].waited_s == pytest.approx(0.31)
    assert s.step(0.31).wake_at is None  # nothing waits


def test_the_shortest_predicted_prefill_goes_first_when_room_frees() -> None:
    s = _sched(budget_s=0.1, aging=0.0)
    s.submit(_ticket("long0", 8000), 0.0)
    assert _bound(s, 0.0) == ["long0"]  # 0.8 s queued
    for rid, prompt in (("long", 6000), ("mid", 3000), ("short", 500)):
        s.submit(_ticket(rid, prompt, 0.1), 0.1)
    assert _bound(s, 0.1) == []
    s.core.on_first_token("long0", 0.8, cached_tokens=0)
    # short first; it leaves 0.05 s queued, under 0.1, so mid follows; then 0.35 s: long waits.
    assert _bound(s, 0.8) == ["short", "mid"]
    assert s.waiting() == 1


def test_aging_lets_a_long_request_that_waited_go_before_a_new_short_one() -> None:
    s = _sched(budget_s=0.1, aging=1.0)
    s.submit(_ticket("busy", 8000), 0.0)
    assert _bound(s, 0.0) == ["busy"]
    s.submit(_ticket("old_long", 3000, 0.0), 0.0)  # key 0.3 + 0.0
    s.submit(_ticket("new_short", 1000, 0.5), 0.5)  # key 0.1 + 0.5
    s.core.on_first_token("busy", 0.8, cached_tokens=0)
    assert _bound(s, 0.8) == ["old_long"]
    pure_spt = _sched(budget_s=0.1, aging=0.0)
    pure_spt.submit(_ticket("busy", 8000), 0.0)
    pure_spt.step(0.0)
    pure_spt.submit(_ticket("old_long", 3000, 0.0), 0.0)
    pure_spt.submit(_ticket("new_short", 1000, 0.5), 0.5)
    pure_spt.core.on_first_token("busy", 0.8, cached_tokens=0)
    assert _bound(pure_spt, 0.8)[0] == "new_short"


_PREFIX = (1, 2, 3, 4, 5, 6, 7, 8)  # 8000 tokens


def _prefix_on_b0_behind_fill() -> Scheduler:
    """Two backends; b0 holds `_PREFIX` (a finished request) and has 0.6 s queued after it."""
    s = _sched(backends=2, budget_s=0.5, coalesce_tokens=0)
    s.submit(_ticket("warm", 8000, blocks=_PREFIX), 0.0)
    assert [b.decision.backend for b in s.step(0.0).bound] == ["b0"]
    s.core.on_first_token("warm", 0.8, cached_tokens=0)
    s.core.on_finished("warm", 0.8, output_tokens=1, cached_tokens=0)
    s.submit(_ticket("fill", 6000), 0.8)
    assert [b.decision.backend for b in s.step(0.8).bound] == ["b0"]  # idle tie: b0, 0.6 s
    return s


def test_a_request_waits_for_the_backend_holding_its_prefix_rather_than_recompute() -> None:
    s = _prefix_on_b0_behind_fill()
    prefix = _PREFIX
    # Same 8k prefix plus one block: 0.1 s of prefill at b0 after 0.6 s of queue, 0.9 s at b1.
    s.submit(_ticket("repeat", 9000, 0.8, blocks=(*prefix, 9)), 0.8)
    out = s.step(0.8)
    assert out.bound == ()  # b0 is past its budget; b1 has room but would recompute 8k tokens
    assert out.wake_at == pytest.approx(0.9)
    bound = s.step(0.91).bound
    assert [(b.ticket.req.rid, b.decision.backend) for b in bound] == [("repeat", "b0")]


def test_held_work_counts_as_queue_so_the_next_request_goes_elsewhere() -> None:
    s = _prefix_on_b0_behind_fill()
    prefix = _PREFIX
    s.submit(_ticket("repeat", 9000, 0.8, blocks=(*prefix, 9)), 0.8)
    s.submit(_ticket("other", 1000, 0.8), 0.8)
    out = s.step(0.8)
    # "other" (0.1 s) is released first, cheapest at idle b1; "repeat" waits for b0.
    assert [(b.ticket.req.rid, b.decision.backend) for b in out.bound] == [("other", "b1")]
    assert s.waiting() == 1


def test_requests_sharing_a_new_prefix_wait_for_the_first_to_compute_it() -> None:
    s = _sched(backends=2, budget_s=2.0, coalesce_tokens=2000)
    prefix = tuple(range(10, 18))  # 8000 tokens nobody holds
    s.submit(_ticket("lead", 9000, blocks=(*prefix, 100)), 0.0)
    out = s.step(0.0)
    assert [b.ticket.req.rid for b in out.bound] == ["lead"]
    lead_backend = out.bound[0].decision.backend
    # The leader is due at 0.9 s; at 0.2 s its 0.7 s left beat computing 8000 tokens (0.8 s).
    s.submit(_ticket("follow", 9000, 0.2, blocks=(*prefix, 200)), 0.2)
    assert _bound(s, 0.2) == []
    assert s.counters["coalesced_waits"] >= 1
    assert _bound(s, 0.5) == []  # still prefilling
    s.core.on_first_token("lead", 0.9, cached_tokens=0)
    bound = s.step(0.9).bound
    assert [(b.ticket.req.rid, b.decision.backend) for b in bound] == [("follow", lead_backend)]
    assert bound[0].decision.predicted_cached_tokens == 8000


def test_without_coalescing_the_second_request_computes_the_prefix_in_parallel() -> None:
    s = _sched(backends=2, budget_s=2.0, coalesce_tokens=0)
    prefix = tuple(range(30, 38))
    s.submit(_ticket("lead", 9000, blocks=(*prefix, 100)), 0.0)
    s.submit(_ticket("follow", 9000, 0.0, blocks=(*prefix, 200)), 0.0)
    assert sorted(_bound(s, 0.0)) == ["follow", "lead"]


def test_a_request_predicted_to_miss_its_deadline_is_shed_on_arrival_with_retry_after() -> None:
    s = _sched(budget_s=0.5, slo_ttft_s=1.0)
    assert s.submit(_ticket("a", 8000), 0.0) is None
    s.step(0.0)  # 0.8 s queued
    assert s.submit(_ticket("b", 1000), 0.0) is None  # 0.8 + 0.1 <= 1.0
    shed = s.submit(_ticket("c", 4000), 0.0)  # 0.8 + 0.1 held + 0.4 = 1.3 > 1.0
    assert shed is not None and shed.reason == "slo"
    assert shed.predicted_ttft_s == pytest.approx(1.3)
    assert retry_after_header(shed) == "1"
    assert "exceeds the deadline" in shed.message
    # The ticket's own deadline wins over the deployment's.
    assert s.submit(_ticket("d", 4000, deadline=5.0), 0.0) is None
    assert s.counters["shed"] == 1 and s.shed_by_reason == {"slo": 1}


def test_admission_prices_held_work_where_it_waits_not_spread_over_the_pool() -> None:
    s = _prefix_on_b0_behind_fill()
    prefix = _PREFIX
    for i in range(2):  # 0.1 s each at b0 (cached prefix) beats 0.9 s at b1: both wait for b0
        s.submit(_ticket(f"repeat{i}", 9000, 0.8, blocks=(*prefix, 10 + i)), 0.8)
    assert s.step(0.8).bound == () and s.waiting() == 2
    # Spread over the pool: (0.6 + 0.2) / 2 + 0.1 = 0.5 s, inside a 0.8 s deadline. Where the
    # work waits: b0 0.6 + 0.2 + 0.1 = 0.9 s, b1 0.9 s (recompute): 0.9 s either way, a miss.
    shed = s.submit(_ticket("late", 9000, 0.8, blocks=(*prefix, 20), deadline=0.8), 0.8)
    assert shed is not None and shed.reason == "slo"
    assert shed.predicted_ttft_s == pytest.approx(0.9)
    assert s.submit(_ticket("ok", 9000, 0.8, blocks=(*prefix, 21), deadline=1.0), 0.8) is None


def test_the_queue_is_bounded_and_a_wait_times_out() -> None:
    s = _sched(budget_s=0.1, max_queue=2, queue_timeout_s=5.0)
    s.submit(_ticket("busy", 80_000), 0.0)
    s.step(0.0)  # 8 s queued
    assert s.submit(_ticket("w1", 1000), 0.0) is None
    assert s.submit(_ticket("w2", 1000, 1.0), 1.0) is None
    full = s.submit(_ticket("w3", 1000, 1.0), 1.0)
    assert full is not None and full.reason == "queue_full"
    assert full.retry_after_s >= 1.0
    out = s.step(5.0)
    assert [(x.ticket.req.rid, x.reason) for x in out.shed] == [("w1", "timeout")]
    assert s.waiting() == 1


def test_a_wait_times_out_at_the_instant_it_asked_to_be_woken() -> None:
    # 0.0411 + 1.0 - 0.0411 < 1.0 in floats: a check on the wait's length kept the request
    # at the wake-up time it had asked for (arrival + timeout), so the driver was woken at
    # that same instant forever (a simulation hung there).
    arrival, timeout = 0.0411, 1.0
    assert (arrival + timeout) - arrival < timeout
    s = _sched(budget_s=0.1, queue_timeout_s=timeout)
    s.submit(_ticket("busy", 80_000), 0.0)
    s.step(0.0)  # 8 s queued: nothing else binds for a while
    assert s.submit(_ticket("w", 1000, arrival), arrival) is None
    wake = s.step(arrival).wake_at
    assert wake == arrival + timeout
    out = s.step(wake)
    assert [(x.ticket.req.rid, x.reason) for x in out.shed] == [("w", "timeout")]
    assert out.wake_at is None and s.waiting() == 0


def test_a_higher_priority_binds_first() -> None:
    s = _sched(budget_s=0.1)
    s.submit(_ticket("busy", 8000), 0.0)
    s.step(0.0)
    s.submit(_ticket("low", 500, 0.0), 0.0)
    s.submit(_ticket("high", 3000, 0.1, priority=5), 0.1)
    s.core.on_first_token("busy", 0.8, cached_tokens=0)
    assert _bound(s, 0.8)[0] == "high"


def test_a_flooding_tenant_does_not_starve_a_small_one() -> None:
    s = _sched(budget_s=0.05, aging=0.0)
    s.submit(_ticket("busy", 8000), 0.0)
    s.step(0.0)
    for i in range(20):
        s.submit(_ticket(f"flood{i}", 400, 0.0, tenant="flood"), 0.0)
    s.submit(_ticket("small0", 1000, 0.2, tenant="small"), 0.2)
    s.submit(_ticket("small1", 1000, 0.2, tenant="small"), 0.2)
    assert s.waiting("small") == 2 and s.waiting("flood") == 20
    order: list[str] = []
    now = 0.8
    s.core.on_first_token("busy", now, cached_tokens=0)
    while len(s):
        for b in s.step(now).bound:
            order.append(b.ticket.req.rid)
            now += 0.1
            s.core.on_first_token(b.ticket.req.rid, now, cached_tokens=0)
    # Shares are even by predicted prefill seconds: each 0.1 s small request comes after at
    # most ~2.5 flood requests' worth (0.04 s each), not after all twenty.
    assert order.index("small0") <= 3
    assert order.index("small1") <= 6


def test_policies_without_queue_predictions_use_pending_tokens() -> None:
    s = _sched(backends=2, policy="round_robin", budget_s=0.5)
    for i in range(6):
        s.submit(_ticket(f"r{i}", 3000), 0.0)
    out = s.step(0.0)
    # 0.1 s per request at DEFAULT_PP: each backend takes requests while under 0.5 s.
    per = 3000 / DEFAULT_PP
    assert len(out.bound) == 6 or all(
        sum(1 for b in out.bound if b.decision.backend == bid) * per >= 0.5 for bid in ("b0", "b1")
    )
    assert s.waiting() == 6 - len(out.bound)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="budget_s"):
        SchedulerConfig(budget_s=0)
    with pytest.raises(ValueError, match="deadline_s"):
        _ticket("x", 10, deadline=0.0)
    s = _sched()
    s.submit(_ticket("dup", 10), 0.0)
    with pytest.raises(ValueError, match="already waiting"):
        s.submit(_ticket("dup", 10), 0.0)


def test_the_simulator_drives_the_scheduler_and_every_request_ends_once() -> None:
    trace = shared_prefix(SharedPrefixConfig(seed=1, groups=8, prompts_per_group=8))
    sched = SchedulerConfig(slo_ttft_s=0.5, shed_factor=1.0)
    cfg = SimConfig(profiles=("llama3-8b-h100",) * 2, load=40.0, scheduler=sched)
    run = simulate_policy(trace, "cost", cfg, tenant_of=lambda t: "a" if t.index % 2 else "b")
    assert len(run.outcomes) == len(trace.requests)
    assert len({o.rid for o in run.outcomes}) == len(trace.requests)
    summary = run.summary
    assert summary["shed"] > 0  # 40x the rate on two GPUs: admission sheds
    assert summary["failed"] == summary["shed"]  # a shed request is a failed one
    assert capacity_p90(summary) == float("inf")
    assert summary["shed_answer_max_s"] == 0.0  # shed on arrival, never after a wait
    assert summary["router_wait_p90"] >= 0.0
    assert summary["goodput_rps"] > 0
    assert set(summary["tenants"]) == {"a", "b"}
    unscheduled = simulate_policy(trace, "cost", SimConfig(profiles=("llama3-8b-h100",) * 2))
    assert unscheduled.summary["shed"] == 0 and unscheduled.summary["router_wait_p90"] == 0.0


def test_with_a_target_a_request_already_past_it_goes_after_those_that_can_still_meet_it() -> None:
    def first_released(late_last_s: float | None) -> str:
        s = _sched(budget_s=0.1, aging=0.0, late_last_s=late_last_s)
        s.submit(_ticket("busy", 8000), 0.0)
        s.step(0.0)
        s.submit(_ticket("late", 3000, 0.0), 0.0)  # at 0.8 s: waited 0.8 + 0.3 > 1.0
        s.submit(_ticket("on_time", 5000, 0.7), 0.7)  # waited 0.1 + 0.5 <= 1.0
        s.core.on_first_token("busy", 0.8, cached_tokens=0)
        return _bound(s, 0.8)[0]

    assert first_released(None) == "late"  # shortest first
    assert first_released(1.0) == "on_time"


def test_a_request_still_on_time_is_found_behind_any_number_of_late_ones() -> None:
    # scan 2: a step looks at 2 requests. Nine late requests (shorter, so first in SPT order)
    # fill the front the rule used to search (4 x scan = 8); the one still on time is 10th.
    s = _sched(budget_s=0.1, aging=0.0, late_last_s=1.0, scan=2)
    s.submit(_ticket("busy", 8000), 0.0)
    s.step(0.0)
    for i in range(9):
        s.submit(_ticket(f"late{i}", 3000, 0.0), 0.0)  # at 0.8 s: waited 0.8 + 0.3 > 1.0
    s.submit(_ticket("on_time", 5000, 0.7), 0.7)  # waited 0.1 + 0.5 <= 1.0
    s.core.on_first_token("busy", 0.8, cached_tokens=0)
    assert _bound(s, 0.8)[0] == "on_time"


def _twenty_running_bound_at_ten_a_second(**config: object) -> Scheduler:
    """One backend with 20 running slots, all taken by requests bound one every 0.1 s."""
    s = _sched(max_running=20, budget_s=0.5, **config)
    for i in range(20):
        t = 0.1 * i
        s.submit(_ticket(f"run{i}", 100, t, tenant="flood"), t)
        assert _bound(s, t) == [f"run{i}"]
        s.core.on_first_token(f"run{i}", t + 0.01, cached_tokens=0)  # decoding: still in flight
    return s


def test_a_backend_with_every_running_slot_taken_takes_nothing_more() -> None:
    s = _twenty_running_bound_at_ten_a_second()
    s.submit(_ticket("next", 100, 2.0), 2.0)
    # Its predicted queue is ~0 s, far under the budget, but the engine would only queue it.
    assert _bound(s, 2.0) == []
    s.core.on_finished("run0", 2.1, output_tokens=10, cached_tokens=0)
    assert _bound(s, 2.1) == ["next"]


def test_a_request_behind_one_waiting_for_a_running_slot_prices_that_wait() -> None:
    # b0 holds a 9,000-token prefix and its one running slot is taken; b1 is idle.
    s = _sched(backends=2, max_running=1, budget_s=0.5)
    prefix = tuple(range(50_000, 50_009))
    s.submit(_ticket("running", 9000, 0.0, blocks=prefix), 0.0)
    (first,) = s.step(0.0).bound
    s.core.on_first_token("running", 0.9, cached_tokens=0)  # decoding at b0, prefix cached
    b0 = first.decision.backend
    b1 = "b1" if b0 == "b0" else "b0"
    # x: 9,000 cached at b0 (0.1 s of prefill) against 1.0 s at b1: it waits for b0's slot.
    s.submit(_ticket("x", 10_000, 1.0, blocks=(*prefix, 60_000)), 1.0)
    assert _bound(s, 1.0) == []
    # y waits behind x for the same slot: besides x's and its own prefill (0.1 + 0.1 s) it
    # waits for requests to finish there. b0's full-batch rate, one slot: each request its
    # 0.9 s prefill (the size bound lately) and 256 decode steps (no outputs seen yet) of 0.01 s.
    gap = s._slot_gap_s(next(st for st in s.core.backends() if st.id == b0))
    assert gap == pytest.approx(0.9 + 256 * 0.01)  # far later than b1's 1.0 s first token
    s.submit(_ticket("y", 10_000, 1.0, blocks=(*prefix, 60_001)), 1.0)
    out = s.step(1.0)
    assert [(b.ticket.req.rid, b.decision.backend) for b in out.bound] == [("y", b1)]


def test_admission_counts_the_requests_held_ahead_at_the_rate_the_pool_binds_them() -> None:
    def late(**config: object) -> object:
        s = _twenty_running_bound_at_ten_a_second(**config)
        for i in range(10):  # held: no running slot; each predicted to meet a 5 s deadline
            held = _ticket(f"held{i}", 100, 2.0, tenant="flood", deadline=5.0)
            assert s.submit(held, 2.0) is None
        assert _bound(s, 2.0) == [] and s.waiting() == 10
        return s.submit(_ticket("late", 100, 2.0, tenant="flood", deadline=0.5), 2.0)

    # 19 binds after the first in the 2 s up to now: 9.5 a second (a pool that stops binding
    # shows a falling rate); 10 held ahead: 10 / 9.5 s, + 0.01 s of prefill.
    shed = late()
    assert shed is not None and shed.reason == "slo"  # type: ignore[attr-defined]
    assert shed.predicted_ttft_s == pytest.approx(10 / 9.5 + 0.01)  # type: ignore[attr-defined]
    # Priced by prefill seconds alone (queue ~0, 0.1 s held) it would be admitted, and wait.
    assert late(rate_admission=False, throughput_admission=False) is None


def test_a_light_tenant_is_not_priced_behind_a_floods_backlog() -> None:
    def first_two(**config: object) -> list[str]:
        s = _twenty_running_bound_at_ten_a_second(**config)
        for i in range(10):
            s.submit(_ticket(f"held{i}", 100, 2.0, tenant="flood", deadline=5.0), 2.0)
        # Fair queueing interleaves tenants: one flood request is ahead of it, not ten.
        assert s.submit(_ticket("small", 100, 2.0, tenant="small", deadline=0.5), 2.0) is None
        s.core.on_finished("run0", 2.1, output_tokens=10, cached_tokens=0)
        s.core.on_finished("run1", 2.1, output_tokens=10, cached_tokens=0)
        return _bound(s, 2.1)  # two slots free: never held1 before it

    # Service counted since the start: small starts level with the flood (no banked credit),
    # the tie goes by name. (Without shares, throughput admission would price small behind
    # the flood's ten: 10 / (1.5 * 20 / 2.76) s.)
    assert first_two(isolation=False, throughput_admission=False) == ["held0", "small"]
    # Counted over the share window (isolation, the default): the flood had twenty binds in
    # it and small none, so small goes first.
    assert first_two() == ["small", "held0"]


def test_engine_priority_sends_an_under_share_tenant_ahead_and_past_the_budget() -> None:
    def run(**config: object) -> list[tuple[str, int | None]]:
        s = _sched(budget_s=0.1, **config)
        s.submit(_ticket("busy", 8000, 0.0, tenant="flood"), 0.0)
        out = [(b.ticket.req.rid, b.engine_priority) for b in s.step(0.0).bound]
        s.submit(_ticket("flood1", 1000, 0.1, tenant="flood"), 0.1)
        s.submit(_ticket("small", 1000, 0.1, tenant="small"), 0.1)
        return out + [(b.ticket.req.rid, b.engine_priority) for b in s.step(0.1).bound]

    # The flood has all the bound prefill: the small tenant is under its share. Inside the
    # engine it goes ahead of the flood's queue, so holding it here would only delay it.
    assert run(engine_priority=True) == [("busy", 0), ("small", 1)]
    assert run() == [("busy", None)]  # both wait for the 0.8 s queue to drain
    with pytest.raises(ValueError, match="reserve"):
        SchedulerConfig(reserve=1.0)


def test_a_reserve_keeps_running_slots_for_under_share_tenants() -> None:
    def bound(reserve: float) -> list[str]:
        s = _sched(max_running=4, budget_s=10.0, engine_priority=True, reserve=reserve)
        for i in range(4):
            s.submit(_ticket(f"flood{i}", 100, 0.0, tenant="flood"), 0.0)
        out = _bound(s, 0.0)
        s.submit(_ticket("small", 100, 0.1, tenant="small"), 0.1)
        return out + _bound(s, 0.1)

    assert bound(0.5) == ["flood0", "flood1", "small"]  # half the slots kept: 2 for the flood
    assert bound(0.0) == ["flood0", "flood1", "flood2", "flood3"]  # no slot left for it


def _isolation_scenario(isolation: bool, small: str = "small") -> list[list[str]]:
    """Two backends, budget 0.5 s. A flood request (0.4 s of prefill) and a small one (0.02 s)
    bind at once; two more flood requests and one of the small tenant's arrive; then the
    small request's first token empties its backend's queue."""
    s = _sched(backends=2, budget_s=0.5, isolation=isolation)
    s.submit(_ticket("f0", 4000, tenant="flood"), 0.0)
    s.submit(_ticket("s0", 200, tenant=small), 0.0)
    steps = [_bound(s, 0.0)]
    for rid, prompt, tenant in (("f1", 4000, "flood"), ("f2", 4000, "flood"), ("s1", 200, small)):
        s.submit(_ticket(rid, prompt, tenant=tenant), 0.0)
    steps.append(_bound(s, 0.0))
    s.core.on_first_token("s0", 0.02, cached_tokens=0)
    s.core.on_first_token("s1", 0.02, cached_tokens=0)
    steps.append(_bound(s, 0.02))
    return steps


def test_isolation_binds_an_over_share_tenant_only_where_nothing_is_queued() -> None:
    # Shares after the first step: flood 0.4 s, small 0.02 s (fair 0.21): the flood is over
    # its share and has f1, f2 waiting, so isolation is on. Queues: one backend 0.4 s (f0),
    # the other 0.02 s (s0): neither under 0.01 s, so f1 and f2 wait; s1 (under its share)
    # binds under the usual 0.5 s budget. Once s0 and s1 have their first tokens that
    # backend's queue is empty: f1 binds there (0.4 s), and f2 finds no empty queue.
    assert _isolation_scenario(True) == [["f0", "s0"], ["s1"], ["f1"]]
    # Without isolation the budget alone decides, tenants interleaved: f1 joins the 0.02 s
    # queue (0.42 s), s1 the 0.4 s one (behind f0's prefill), f2 then finds 0.42 s < 0.5 s.
    assert _isolation_scenario(False) == [["f0", "s0"], ["f1", "s1", "f2"], []]


def test_isolation_needs_two_tenants() -> None:
    # One tenant is never under its share: the same arrivals bind as without isolation.
    assert _isolation_scenario(True, small="flood") == _isolation_scenario(False, small="flood")
    with pytest.raises(ValueError, match="isolation_queue_s"):
        SchedulerConfig(isolation_queue_s=0.0)


def test_isolation_leaves_a_single_tenant_simulation_unchanged() -> None:
    trace = shared_prefix(SharedPrefixConfig(seed=1, groups=8, prompts_per_group=8))
    runs = []
    for isolation in (True, False):
        sched = SchedulerConfig(slo_ttft_s=0.5, isolation=isolation)
        cfg = SimConfig(profiles=("llama3-8b-h100",) * 2, load=40.0, scheduler=sched)
        runs.append(simulate_policy(trace, "cost", cfg))
    on, off = ([(o.rid, o.backend, o.ttft, o.error) for o in r.outcomes] for r in runs)
    assert on == off and runs[0].summary["shed"] > 0


def test_admission_sheds_what_comes_faster_than_full_batches_turn_over() -> None:
    def admitted(headroom: float) -> tuple[list[str], list[float]]:
        s = _sched(max_running=4, throughput_headroom=headroom, slo_ttft_s=2.0)
        out, shed_at = [], []
        for i in range(8):
            shed = s.submit(_ticket(f"r{i}", 100, 0.0), 0.0)
            if shed is None:
                out.append(f"r{i}")
            else:
                shed_at.append(shed.predicted_ttft_s or 0.0)
            s.step(0.0)
        return out, shed_at

    # Full batch: 4 slots, each request 256 steps (the default expected output) of 0.01 s
    # plus its 0.01 s prefill: 4 / 2.6 requests a second, one admitted every 0.65 s. r0 is
    # priced with nothing bound yet (no size to price the batch with); r1 starts the clock,
    # r2..r4 wait 0.65 / 1.3 / 1.95 s for it (+ 0.01 s prefill); r5 would wait 2.6 s.
    out, shed_at = admitted(1.0)
    assert out == ["r0", "r1", "r2", "r3", "r4"]
    assert shed_at[0] == pytest.approx(4 * 0.65 + 0.01)
    # Twice the rate: 0.325 s apart, so r1..r7 are all within 2 s.
    assert admitted(2.0)[0] == [f"r{i}" for i in range(8)]


def test_the_throughput_clock_catches_up_with_time() -> None:
    s = _sched(max_running=4, throughput_headroom=1.0, slo_ttft_s=2.0)
    for i in range(5):
        s.submit(_ticket(f"r{i}", 100, 0.0), 0.0)
        for b in s.step(0.0).bound:  # decoding, on time: no lateness in the queue
            s.core.on_first_token(b.ticket.req.rid, 0.0, cached_tokens=0)
    assert s.submit(_ticket("early", 100, 0.5), 0.5) is not None  # 2.6 - 0.5 + 0.01 > 2
    # By 2.6 s the pool has turned over the four admitted after r0 (as far as the clock says).
    assert s.submit(_ticket("later", 100, 2.6), 2.6) is None


def _cost_prefers_a_full_backend(stream_tokens: int) -> Scheduler:
    """b0 decodes a `stream_tokens` stream; b1 has a 500-token prefill queued (0.05 s), past
    the 0.04 s budget: no room at b1, room at b0."""
    prior = PerfPrior(
        prefill_tokens_per_s=10_000.0,
        prefill_s_per_token_ctx=0.0,
        decode_step_s=0.01,
        decode_s_per_kv_token=1e-6,
    )
    specs = [BackendSpec(id=b, kv_capacity_tokens=1_000_000, prior=prior) for b in ("b0", "b1")]
    core = RoutingCore(make_policy("cost", calibrate=False, interference=0.0), specs)
    core.route(_ticket("stream", stream_tokens).req, 0.0)
    core.on_first_token("stream", 1.0, cached_tokens=0)
    assert core.route(_ticket("queued", 500).req, 1.0).backend == "b1"
    return Scheduler(core, SchedulerConfig(budget_s=0.04))


def test_an_under_share_request_goes_where_its_first_token_comes_soonest() -> None:
    # b0 decodes a 10k-token stream: every step there takes 0.01 + 1e-6 * 10_001 s = 0.02 s.
    # b1 has a 500-token prefill queued (0.05 s); the policy sent it there, away from b0.
    s = _cost_prefers_a_full_backend(10_000)
    core = s.core
    req = _ticket("small", 500).req  # 0.05 s of prefill, 10 output tokens
    backends = core.backends()
    # TTFT: b0 0.05 + 0.02 (the decode step its prefill step carries), b1 0.05 + 0.05.
    # The policy's cost adds 10 decode steps and, at b1, the 0.05 s its prefill delays the
    # queued request: b0 0.07 + 10 * 0.0205 = 0.275, b1 0.10 + 10 * 0.0105 + 0.05 = 0.255.
    by_cost = s._choose(req, backends, 1.0, {"b0": 0.0, "b1": 0.0})
    assert by_cost.backend == "b1"
    fastest = s._fastest(req, backends, 1.0, {"b0": 0.0, "b1": 0.0})
    assert fastest.backend == "b0"
    assert fastest.predicted_ttft_s == pytest.approx(0.05 + 0.01 + 1e-6 * 10_001)


def test_a_request_does_not_wait_for_a_full_backend_when_one_with_room_is_as_fast() -> None:
    s = _cost_prefers_a_full_backend(10_000)
    s.submit(_ticket("small", 500, 1.0), 1.0)  # 0.05 s of prefill, 10 output tokens
    # TTFT: b0 0.05 + 0.02 (the decode step its prefill step carries: 0.01 + 1e-6 * 10_001),
    # b1 0.05 queued + 0.05. Cost adds 10 decode steps and at b1 the 0.05 s its prefill delays
    # the queued one: b0 0.07 + 10 * 0.0205 = 0.275, b1 0.10 + 10 * 0.0105 + 0.05 = 0.255, so
    # the policy picks b1, which has no room. b0 has room, an earlier first token (0.07 <=
    # 0.10) and as much cached (nothing either way): it binds there now instead of waiting.
    out = s.step(1.0)
    assert [(b.ticket.req.rid, b.decision.backend) for b in out.bound] == [("small", "b0")]
    assert out.bound[0].decision.predicted_ttft_s == pytest.approx(0.05 + 0.01 + 1e-6 * 10_001)


def test_a_request_still_waits_for_a_full_backend_that_gives_the_earlier_first_token() -> None:
    s = _cost_prefers_a_full_backend(60_000)
    s.submit(_ticket("small", 500, 1.0), 1.0)
    # b0's decode step is now 0.01 + 1e-6 * 60_001 = 0.07 s: TTFT there 0.05 + 0.07 = 0.12,
    # later than b1's 0.10, so it waits for b1 (whose queue falls under 0.04 s at 1.01 s).
    out = s.step(1.0)
    assert out.bound == ()
    assert out.wake_at == pytest.approx(1.01)
    assert [(b.ticket.req.rid, b.decision.backend) for b in s.step(1.011).bound] == [
        ("small", "b1")
    ]


def test_while_isolation_is_on_admission_has_no_headroom() -> None:
    def probe(isolation: bool) -> float | None:
        s = _sched(max_running=2, slo_ttft_s=2.0, isolation=isolation)
        s.submit(_ticket("s0", 100, tenant="small"), 0.0)  # nothing bound yet: not paced
        assert _bound(s, 0.0) == ["s0"]
        for rid, prompt in (("f0", 1000), ("f1", 100), ("f2", 100)):
            assert s.submit(_ticket(rid, prompt, tenant="flood"), 0.0) is None
            s.step(0.0)  # f0 takes the second running slot; f1 and f2 wait here
        shed = s.submit(_ticket("f3", 100, tenant="flood"), 0.0)
        return None if shed is None else shed.predicted_ttft_s

    # Full batch: 2 slots, 256 steps of 0.01 s each, plus the mean prefill of what was bound:
    # 0.01 s after s0 (2.58 s a turn), 0.055 s after f0 too (2.67 s). f0 and f1 advance the
    # clock by 2.58 / 3 and 2.67 / 3 s (headroom 1.5). By f2 the flood is over its share
    # (0.1 s of prefill bound against the small tenant's 0.01) with f1 waiting here, so
    # isolation is on: f2 advances it by 2.67 s / 2 slots, with no headroom.
    assert probe(True) == pytest.approx(0.86 + 0.89 + 1.335 + 0.01)
    assert probe(False) == pytest.approx(0.86 + 0.89 + 0.89 + 0.01)
