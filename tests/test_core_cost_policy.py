"""The cost policy: hand-computed decisions, feedback, calibration in the simulator, oracle."""

from __future__ import annotations

import dataclasses

import pytest

from backends.sim.perf import get_profile
from router.core.cost_policy import CostPolicy, OraclePolicy
from router.core.model import BackendSpec, BackendState, PerfPrior, RouteRequest
from router.core.policies import make_policy
from router.core.routing import RoutingCore
from router.replay.gentrace import UnsharedConfig, unshared
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace

# 10k tokens/s prefill, no attention term, 10 ms decode steps: easy arithmetic.
PRIOR = PerfPrior(
    prefill_tokens_per_s=10_000.0,
    prefill_s_per_token_ctx=0.0,
    decode_step_s=0.01,
    decode_s_per_kv_token=0.0,
)


def _core(interference: float = 0.0) -> RoutingCore:
    specs = [BackendSpec(id=b, kv_capacity_tokens=1_000_000, prior=PRIOR) for b in ("a", "b")]
    return RoutingCore(make_policy("cost", interference=interference, calibrate=False), specs)


def _req(rid: str, blocks: tuple[int, ...], prompt: int, max_tokens: int = 10) -> RouteRequest:
    return RouteRequest(
        rid=rid, blocks=blocks, block_tokens=1000, prompt_tokens=prompt, max_tokens=max_tokens
    )


def test_idle_pool_first_request_costs_its_whole_prefill() -> None:
    core = _core()
    decision = core.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    assert decision.backend == "a"  # equal costs: the first backend
    assert decision.predicted_cached_tokens == 0
    assert decision.predicted_ttft_s == pytest.approx(4000 / 10_000)


def test_a_queue_longer_than_the_saving_sends_the_repeat_elsewhere() -> None:
    core = _core()
    core.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    # At t=0 "a" believes it will hold the prefix, but it is busy for 0.4 s: 0.4 + 1 token of
    # prefill at "a" (cached 3999, the n-1 cap) against 0.4 s of prefill at idle "b".
    decision = core.route(_req("r2", (1, 2, 3, 4), 4000), 0.0)
    assert decision.backend == "b"
    assert decision.predicted_ttft_s == pytest.approx(0.4)


def test_a_cached_prefix_beats_an_idle_backend() -> None:
    core = _core()
    core.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    core.on_first_token("r1", 0.4, cached_tokens=0)
    core.on_finished("r1", 0.5, output_tokens=10, cached_tokens=0)
    # The next turn extends the prefix by one block: 1000 new tokens at "a" vs 5000 at "b".
    decision = core.route(_req("r3", (1, 2, 3, 4, 5), 5000), 1.0)
    assert decision.backend == "a"
    assert decision.predicted_cached_tokens == 4000
    assert decision.predicted_ttft_s == pytest.approx(1000 / 10_000)


def test_a_busy_decoder_adds_one_step_to_ttft_and_interference_to_cost() -> None:
    core = _core(interference=1.0)
    core.route(_req("r1", (1,), 1000), 0.0)
    core.on_first_token("r1", 0.1, cached_tokens=0)  # "a" is now decoding one stream
    # Same prompt size, nothing cached anywhere: "a" costs one mixed decode step (10 ms) more
    # TTFT, plus interference 1.0 x 1 stream x 0.3 s prefill: "b" wins.
    decision = core.route(_req("r2", (7, 8, 9), 3000), 0.2)
    assert decision.backend == "b"
    assert decision.predicted_ttft_s == pytest.approx(0.3)
    policy = core.policy
    assert isinstance(policy, CostPolicy)


def test_decode_time_is_priced_at_the_batch_the_request_would_join() -> None:
    # Decode steps cost 10 ms + 1 us per KV token in the batch. "a" decodes 20 streams of 1,000
    # KV tokens (20,000), "b" one stream of 26,000. A 1,000-token request, 10 output tokens
    # expected (N/2 = 5), nothing cached, no queue anywhere:
    #   cost = prefill 0.1 + mixed step (0.01 + kv e-6) + 10 x (0.01 + (kv + 1005) e-6)
    #          a: 0.1 + 0.030 + 0.31005 = 0.44005     b: 0.1 + 0.036 + 0.37005 = 0.50605
    # (the streams already there are not charged for: see docs/architecture.md)
    prior = dataclasses.replace(PRIOR, decode_s_per_kv_token=1e-6)
    specs = {b: BackendSpec(id=b, kv_capacity_tokens=1_000_000, prior=prior) for b in "ab"}
    states = [
        BackendState(spec=specs["a"], decoding=20, decoding_kv_tokens=20_000),
        BackendState(spec=specs["b"], decoding=1, decoding_kv_tokens=26_000),
    ]
    policy = make_policy("cost", interference=0.0, calibrate=False)
    for spec in specs.values():
        policy.on_backend_added(spec)
    choice = policy.choose(_req("r1", (1,), 1000, max_tokens=10), states, 0.0)
    assert choice.backend == "a"
    assert choice.reason == "cost 0.440s"
    assert choice.predicted_ttft_s == pytest.approx(0.13)


def _one_backend(**options: float | bool) -> RoutingCore:
    spec = BackendSpec(id="a", kv_capacity_tokens=1_000_000, prior=PRIOR)
    return RoutingCore(make_policy("cost", interference=0.0, **options), [spec])


def test_the_queue_counts_the_decode_step_each_pending_prefill_will_share() -> None:
    # "a" decodes one stream (10 ms steps). r2's 3,000 tokens will take 0.3 s of prefill in a
    # step that also carries the decode: 0.31 s. r3, queued behind it, waits for all of that.
    for net_decode, queue in ((True, 0.31), (False, 0.3)):
        core = _one_backend(calibrate=False, net_decode=net_decode)
        core.route(_req("r1", (1,), 1000), 0.0)
        core.on_first_token("r1", 0.1, cached_tokens=0)
        assert core.route(_req("r2", (2, 3, 4), 3000), 0.2).predicted_ttft_s == pytest.approx(0.31)
        r3 = core.route(_req("r3", (5,), 1000), 0.2)
        assert r3.predicted_ttft_s == pytest.approx(queue + 0.1 + 0.01), net_decode


def test_pp_is_learned_net_of_the_decode_share_of_mixed_steps() -> None:
    # True PP is the prior's 10k tokens/s; every prefill runs beside one decoding stream, so its
    # first token comes after 0.1 s of prefill plus the 10 ms decode step it shares. Counting
    # that step as prefill would learn 1,000 / 0.11 = 9.1k tokens/s.
    for net_decode, expected in ((True, 10_000.0), (False, 1000 / 0.11)):
        core = _one_backend(calibrate=True, net_decode=net_decode)
        core.route(_req("d", (1,), 1000), 0.0)
        core.on_first_token("d", 0.1, cached_tokens=0)  # idle backend: all prefill
        for i in range(60):
            t = 1.0 + i
            core.route(_req(f"r{i}", (100 + i,), 1000), t)
            core.on_first_token(f"r{i}", t + 0.11, cached_tokens=0)
            core.on_finished(f"r{i}", t + 0.2, output_tokens=1, cached_tokens=0)
        policy = core.policy
        assert isinstance(policy, CostPolicy)
        learned = policy.learned()["a"]["prefill_tokens_per_s"]
        assert learned == pytest.approx(expected, rel=0.03), net_decode


def test_a_busy_period_spent_mostly_on_decode_steps_teaches_nothing_about_pp() -> None:
    # 10 tokens of prefill (1 ms) in a step dominated by the 10 ms decode share: skipped.
    core = _one_backend(calibrate=True)
    core.route(_req("d", (1,), 1000), 0.0)
    core.on_first_token("d", 0.1, cached_tokens=0)
    policy = core.policy
    assert isinstance(policy, CostPolicy)
    before = policy._models["a"].perf.prefill_observations
    core.route(_req("tiny", (2,), 10), 1.0)
    core.on_first_token("tiny", 1.011, cached_tokens=0)
    assert policy._models["a"].perf.prefill_observations == before


def test_a_prefill_is_charged_for_the_first_tokens_it_delays_on_a_busy_backend() -> None:
    # "a" holds 4,000 tokens of r2's prefix and has r1 pending (0.3 s of prefill left). r2 (6,000
    # tokens) at "a": queue 0.3 + 2,000 new tokens 0.2 = TTFT 0.5; its chunks share r1's steps,
    # delaying r1's first token by min(0.2, 0.3). At idle "b": all 6,000 tokens, 0.6.
    for weight, backend, ttft in ((0.0, "a", 0.5), (1.0, "b", 0.6)):
        core = _core_with(lateness=False, pending_interference=weight)
        core.route(_req("r0", (1, 2, 3, 4), 4000), 0.0)
        core.on_first_token("r0", 0.4, cached_tokens=0)
        core.on_finished("r0", 0.5, output_tokens=10, cached_tokens=0)
        assert core.route(_req("r1", (9, 10, 11), 3000), 1.0).backend == "a"  # tie: the first
        decision = core.route(_req("r2", (1, 2, 3, 4, 5, 6), 6000), 1.0)
        assert (decision.backend, decision.predicted_ttft_s) == (backend, pytest.approx(ttft))


def test_a_backend_late_on_its_predictions_looks_as_busy_as_it_is_late() -> None:
    for lateness in (False, True):
        core = _core_with(lateness=lateness)
        core.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)  # "a": first token predicted at 0.4 s
        # At 1.4 s "a" has still not answered: 1 s late. A repeat of the prefix costs 1 token
        # of prefill at "a" plus the lateness, against 0.4 s of prefill at idle "b".
        decision = core.route(_req("r2", (1, 2, 3, 4), 4000), 1.4)
        if lateness:
            assert decision.backend == "b"
        else:
            assert decision.backend == "a"
            assert decision.predicted_ttft_s == pytest.approx(1 / 10_000)


def test_a_non_streaming_request_is_never_counted_late() -> None:
    # Its first token is seen only at the end, so waiting for it past 0.4 s means nothing.
    core = _core_with(lateness=True)
    core.route(dataclasses.replace(_req("r1", (1, 2, 3, 4), 4000), first_token_seen=False), 0.0)
    decision = core.route(_req("r2", (1, 2, 3, 4), 4000), 1.4)
    assert decision.backend == "a"


def _core_with(**options: float | bool) -> RoutingCore:
    specs = [BackendSpec(id=b, kv_capacity_tokens=1_000_000, prior=PRIOR) for b in ("a", "b")]
    return RoutingCore(make_policy("cost", interference=0.0, calibrate=False, **options), specs)


def test_feedback_of_an_eviction_stops_the_prefix_attracting_requests() -> None:
    core = _core()
    core.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    core.on_first_token("r1", 0.4, cached_tokens=0)
    core.on_finished("r1", 0.5, output_tokens=10, cached_tokens=0)
    core.route(_req("r2", (1, 2, 3, 4, 5), 5000), 1.0)
    # "a" reports it had nothing: it evicted the prefix we believed it held.
    core.on_first_token("r2", 1.5, cached_tokens=0)
    core.on_finished("r2", 1.6, output_tokens=10, cached_tokens=0)
    policy = core.policy
    assert isinstance(policy, CostPolicy)
    held = policy.index.match((1, 2, 3, 4, 5, 6))
    # The whole prompt was just prefilled there, so it is held again, but the older beliefs
    # beyond it were dropped by the shortfall (4000 predicted, 0 reported).
    assert held.get("a", 0) == 5


def test_learned_speeds_are_exposed_per_backend() -> None:
    core = _core()
    policy = core.policy
    assert isinstance(policy, CostPolicy)
    learned = policy.learned()
    assert set(learned) == {"a", "b"}
    assert learned["a"]["prefill_tokens_per_s"] == pytest.approx(10_000.0)
    assert learned["a"]["decode_tokens_per_s_single"] == pytest.approx(100.0)


def test_decisions_use_what_the_model_has_just_learned() -> None:
    """`choose` caches each backend's speeds; any observation must reach the next decision."""
    core = _core()
    policy = core.policy
    assert isinstance(policy, CostPolicy)
    req = _req("r0", (1, 2), 2000, max_tokens=0)
    # idle pool, no cache: TTFT is the whole prefill at the prior's 10k tokens/s
    assert policy.choose(req, core.backends(), 0.0).predicted_ttft_s == pytest.approx(0.2)
    for backend in ("a", "b"):
        perf = policy._models[backend].perf
        for _ in range(40):  # both now prefill at 5k tokens/s
            perf.observe_prefill(2000, 2000, 0.4)
        learned = perf.learned()
        assert policy._models[backend].speeds()[0] == 1.0 / learned.prefill_tokens_per_s
    assert policy.choose(req, core.backends(), 0.0).predicted_ttft_s == pytest.approx(0.4, rel=0.05)


def test_oracle_refuses_to_run_outside_the_simulator() -> None:
    core = RoutingCore(OraclePolicy(), [BackendSpec(id="a"), BackendSpec(id="b")])
    with pytest.raises(RuntimeError, match="simulator"):
        core.route(_req("r1", (1,), 1000), 0.0)


def _unshared_trace(n: int, rate: float, seed: int) -> Trace:
    return unshared(UnsharedConfig(requests=n, request_rate=rate, seed=seed))


@pytest.mark.slow
def test_a_pool_twice_slower_than_the_prior_is_learned_within_ten_percent() -> None:
    fast = get_profile("llama3-8b-h100")
    slow = dataclasses.replace(
        fast,
        name="h100-at-half-speed",
        mfu=fast.mfu / 2,
        bw_efficiency=fast.bw_efficiency / 2,
        step_overhead_s=fast.step_overhead_s * 2,
    )
    run = simulate_policy(
        _unshared_trace(240, 0.5, seed=3),
        "cost",
        SimConfig(profiles=(slow,) * 4, believed=(fast,) * 4),
    )
    assert run.summary["failed"] == 0
    policy = run.core.policy
    assert isinstance(policy, CostPolicy)
    true_pp = 2048 / slow.prefill_time(2048, 2048)
    true_step = slow.decode_step_time(1, 4096)
    for backend, model in policy._models.items():
        learned_pp = 2048 / model.perf.prefill_time(2048, 2048)
        assert learned_pp == pytest.approx(true_pp, rel=0.10), backend
        assert model.perf.decode_step_time(4096) == pytest.approx(true_step, rel=0.10), backend
        # and it moved from the prior, which was twice as fast
        assert learned_pp < 0.6 * (2048 / fast.prefill_time(2048, 2048))


@pytest.mark.slow
def test_a_mixed_pool_is_learned_within_ten_percent_and_the_fast_get_more_work() -> None:
    # Told that all four are H100s; two are A100s. At 6 requests/s the H100s cannot take it
    # all, so the A100s get work, and calibration sees them (benchmarks/calibration.py shows
    # the lighter loads, where the slow pair is left idle and stays unlearned).
    fast, slow = get_profile("llama3-8b-h100"), get_profile("llama3-8b-a100")
    truth = (fast, fast, slow, slow)
    run = simulate_policy(
        _unshared_trace(240, 6.0, seed=3),
        "cost",
        SimConfig(profiles=truth, believed=(fast,) * 4),
    )
    assert run.summary["failed"] == 0
    routed = {b: s["routed"] for b, s in run.stats["backends"].items()}
    assert routed["b0"] + routed["b1"] > 1.5 * (routed["b2"] + routed["b3"])
    policy = run.core.policy
    assert isinstance(policy, CostPolicy)
    for i, profile in enumerate(truth):
        perf = policy._models[f"b{i}"].perf
        true_pp = 2048 / profile.prefill_time(2048, 2048)
        assert 2048 / perf.prefill_time(2048, 2048) == pytest.approx(true_pp, rel=0.10), i
        true_step = profile.decode_step_time(1, 4096)
        assert perf.decode_step_time(4096) == pytest.approx(true_step, rel=0.10), i


def test_the_default_prior_is_the_llama3_8b_h100_profile() -> None:
    from router.core.cost_policy import DEFAULT_PRIOR
    from router.priors import prior_named

    truth = prior_named("llama3-8b-h100")
    for field in dataclasses.fields(PerfPrior):
        assert getattr(DEFAULT_PRIOR, field.name) == pytest.approx(
            getattr(truth, field.name), rel=0.01
        ), field.name


def test_another_replicas_routing_is_seen_as_cache_and_queue() -> None:
    here, there = _core(), _core()
    decision = there.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    remote = _req("replica2/r1", (1, 2, 3, 4), 4000)
    here.policy.on_remote_routed(decision.backend, remote, 0.0)
    # Same prefix, a moment later: "a" is believed to hold it but is busy for 0.4 s with
    # the other replica's request, so the repeat goes to "b" (as on one replica).
    assert here.route(_req("r2", (1, 2, 3, 4), 4000), 0.0).backend == "b"
    here.policy.on_remote_first_token(decision.backend, remote.rid, 0.4)
    here.policy.on_remote_ended(decision.backend, remote.rid, 0.5)
    follow_up = here.route(_req("r3", (1, 2, 3, 4, 5), 5000), 1.0)
    # both hold the prefix now and both are idle: equal cost, and the tie goes to "a"
    assert follow_up.backend == "a"
    assert follow_up.predicted_cached_tokens == 4000


def test_service_rate_is_a_full_batch_turning_over_once_per_output() -> None:
    prior = dataclasses.replace(PRIOR, decode_s_per_kv_token=1e-8)
    policy = CostPolicy(calibrate=False)
    for _ in range(4):
        policy.outputs.observe(200)  # N = 200 steps per request
    roomy = BackendState(
        spec=BackendSpec(
            id="a", kv_capacity_tokens=1_000_000, prior=prior, max_running_requests=100
        )
    )
    # B = 100 running slots (1M tokens hold 1000+ requests of 500 new + 200 output tokens);
    # each step reads 100 * (1000 + 100) KV tokens: 0.01 + 1e-8 * 110_000 = 0.0111 s;
    # 100 requests every 200 * 0.0111 s, plus 100 prefills of 0.05 s each.
    assert policy.service_rate(roomy, 1000, 500, 0.05) == pytest.approx(100 / (2.22 + 5.0))
    tight = BackendState(
        spec=BackendSpec(id="b", kv_capacity_tokens=35_000, prior=prior, max_running_requests=100)
    )
    # Memory binds first: 35_000 / (500 + 200) = 50 requests' own KV (a cached prefix is
    # shared); steps of 0.01 + 1e-8 * 50 * 1100 = 0.01055 s.
    assert policy.service_rate(tight, 1000, 500, 0.05) == pytest.approx(
        50 / (200 * 0.01055 + 50 * 0.05)
    )
