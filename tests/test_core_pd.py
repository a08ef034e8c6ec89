"""The PD pair price (router/core/pd.py): hand-computed pairs, the decode quote, PDRouter books."""

from __future__ import annotations

import math

import pytest

from router.core.model import BackendSpec, BackendState, PerfPrior, RequestRecord, RouteRequest
from router.core.pd import (
    DecodeCostPolicy,
    DecodeQuote,
    PairConfig,
    PDRouter,
    PrefillQuote,
    best_pair,
    transfer_time_s,
)
from router.core.policies import make_policy
from router.core.routing import NoBackendError, RoutingCore

# 10k tokens/s prefill, 10 ms decode steps plus 1 us per KV token: easy arithmetic.
PRIOR = PerfPrior(
    prefill_tokens_per_s=10_000.0,
    prefill_s_per_token_ctx=0.0,
    decode_step_s=0.01,
    decode_s_per_kv_token=1e-6,
)


def _req(rid: str, blocks: tuple[int, ...], prompt: int, max_tokens: int = 20) -> RouteRequest:
    return RouteRequest(
        rid=rid, blocks=blocks, block_tokens=1000, prompt_tokens=prompt, max_tokens=max_tokens
    )


def test_transfer_is_prompt_kv_over_the_link() -> None:
    # 4000 tokens x 128 KiB = 524,288,000 bytes at 40 GB/s
    assert transfer_time_s(4000, 131_072, 40e9) == pytest.approx(0.0131072)
    assert transfer_time_s(0, 131_072, 40e9) == 0.0


def _p(backend: str, ttft: float, cost: float) -> PrefillQuote:
    return PrefillQuote(backend=backend, ttft_s=ttft, cost_s=cost)


def _d(backend: str, step: float, wait: float, out: int = 100) -> DecodeQuote:
    return DecodeQuote(backend=backend, step_s=step, room_wait_s=wait, cost_s=(1 + out) * step)


def test_best_pair_adds_the_four_terms() -> None:
    prefills = [_p("p1", 0.5, 0.5), _p("p2", 0.2, 0.3)]
    # d1: 101 x 10 ms = 1.01 s, room now; d2: 101 x 8 ms = 0.808 s, room in 1.0 s
    decodes = [_d("d1", 0.010, 0.0), _d("d2", 0.008, 1.0)]
    quote = best_pair(prefills, decodes, lambda p, d: 0.1)
    # (p2, d1) = 0.3 + 0.1 + 0 + 1.01 = 1.41; (p2, d2) = 0.3 + 0.1 + 0.7 + 0.808 = 1.908
    # (p1, d1) = 0.5 + 0.1 + 0 + 1.01 = 1.61; (p1, d2) = 0.5 + 0.1 + 0.4 + 0.808 = 1.808
    assert quote is not None
    assert (quote.prefill.backend, quote.decode.backend) == ("p2", "d1")
    assert quote.total_s == pytest.approx(1.41)
    assert quote.ttft_s == pytest.approx(0.2 + 0.1 + 0.0 + 0.010)


def test_a_room_wait_adds_in_full_before_the_prefill() -> None:
    # SGLang's decode server preallocates before the prefill may start: nothing hides the wait
    prefills = [_p("p1", 0.5, 0.5), _p("p2", 0.2, 0.3)]
    decodes = [_d("d1", 0.010, 0.0), _d("d2", 0.008, 0.6)]
    quote = best_pair(prefills, decodes, lambda p, d: 0.1)
    # (p2, d1) = 0.3 + 0.1 + 0 + 1.01 = 1.41 beats (p2, d2) = 0.3 + 0.1 + 0.6 + 0.808 = 1.808
    # and (p1, d2) = 0.5 + 0.1 + 0.6 + 0.808 = 2.008
    assert quote is not None
    assert (quote.prefill.backend, quote.decode.backend) == ("p2", "d1")
    assert quote.total_s == pytest.approx(1.41)
    worst = best_pair(prefills[:1], decodes[1:], lambda p, d: 0.1)
    assert worst is not None and worst.wait_s == pytest.approx(0.6)
    assert worst.ttft_s == pytest.approx(0.5 + 0.1 + 0.6 + 0.008)


def test_a_slow_link_moves_the_pair() -> None:
    prefills = [_p("p1", 0.2, 0.2), _p("p2", 0.25, 0.25)]
    decodes = [_d("d1", 0.01, 0.0)]
    slow = {("p1", "d1"): 0.2, ("p2", "d1"): 0.01}
    quote = best_pair(prefills, decodes, lambda p, d: slow[(p, d)])
    assert quote is not None and quote.prefill.backend == "p2"  # 0.26 < 0.4


def test_a_decode_server_that_can_never_fit_is_a_last_resort() -> None:
    prefills = [_p("p1", 0.1, 0.1)]
    never = _d("d1", 0.001, math.inf)
    assert best_pair(prefills, [never, _d("d2", 0.5, 3.0)], lambda p, d: 0.0).decode.backend == "d2"  # type: ignore[union-attr]
    alone = best_pair(prefills, [never], lambda p, d: 0.0)
    assert alone is not None and alone.decode.backend == "d1"
    assert best_pair([], [never], lambda p, d: 0.0) is None


def _decode_state(kv: int, incoming: int, in_flight: int, capacity: int) -> BackendState:
    state = BackendState(spec=BackendSpec(id="d", kv_capacity_tokens=capacity, prior=PRIOR))
    state.decoding_kv_tokens = kv
    state.pending_prefill_tokens = incoming
    for i in range(in_flight):
        state.in_flight[f"x{i}"] = RequestRecord(
            request=_req(f"x{i}", (9,), 1), backend="d", routed_at=0
        )
    return state


def test_decode_quote_by_hand() -> None:
    policy = DecodeCostPolicy()
    state = _decode_state(kv=1000, incoming=500, in_flight=2, capacity=2000)
    (quote,) = policy.quote(_req("r", (1,), 100, max_tokens=20), [state], 0.0)
    # no output seen yet: N = min(20, 256) = 20; batch KV = 1000 + 500 + 100 + 10 = 1610
    step = 0.01 + 1610e-6
    assert quote.step_s == pytest.approx(step)
    assert quote.cost_s == pytest.approx(21 * step)
    # used = 1000 + 500 + 2 x 20 = 1540; needs 120 more: fits in 2000
    assert quote.room_wait_s == 0.0
    tight = _decode_state(kv=1000, incoming=500, in_flight=2, capacity=1600)
    (quote,) = policy.quote(_req("r", (1,), 100, max_tokens=20), [tight], 0.0)
    # deficit 1540 + 120 - 1600 = 60 tokens, freed at 1540 per (20 x step) seconds
    assert quote.room_wait_s == pytest.approx(60 * 20 * step / 1540)
    never = _decode_state(kv=0, incoming=0, in_flight=0, capacity=100)
    (quote,) = policy.quote(_req("r", (1,), 100, max_tokens=20), [never], 0.0)
    assert math.isinf(quote.room_wait_s)


def _pd(pair: bool = True, **links: float) -> PDRouter:
    specs = [BackendSpec(id=b, kv_capacity_tokens=1_000_000, prior=PRIOR) for b in ("p0", "p1")]
    dspecs = [BackendSpec(id=b, kv_capacity_tokens=100_000, prior=PRIOR) for b in ("d0", "d1")]
    if pair:
        prefill = RoutingCore(make_policy("cost", interference=0.0, calibrate=False), specs)
        decode = RoutingCore(make_policy("pd_decode"), dspecs)
        return PDRouter(
            prefill,
            decode,
            pair=PairConfig(kv_bytes_per_token=1000, link_bytes_per_s=1e6),
            links=links,
        )
    prefill = RoutingCore(make_policy("cache_aware"), specs)
    decode = RoutingCore(make_policy("power_of_two"), dspecs)
    return PDRouter(prefill, decode)


def test_pd_router_prices_and_books_a_pair() -> None:
    pd = _pd()
    decision = pd.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    assert decision.quote is not None
    assert (decision.prefill.backend, decision.decode.backend) == ("p0", "d0")
    # 0.4 s prefill + 4000 x 1000 B at 1 MB/s = 4 s transfer + one step (10 ms + 4010 us)
    assert decision.quote.transfer_s == pytest.approx(4.0)
    assert decision.decode.predicted_ttft_s == pytest.approx(0.4 + 4.0 + 0.01 + 4010e-6)
    pstate = {s.id: s for s in pd.prefill.backends()}["p0"]
    dstate = {s.id: s for s in pd.decode.backends()}["d0"]
    assert pstate.pending_prefill_tokens == 4000 and dstate.pending_prefill_tokens == 4000
    # A second request while d0 expects r1's KV: d1 has the lighter batch, p1 the empty queue
    second = pd.route(_req("r2", (7, 8), 2000), 0.0)
    assert (second.prefill.backend, second.decode.backend) == ("p1", "d1")
    pd.on_prefill_done("r1", 0.4, cached_tokens=0)
    assert pstate.pending_prefill_tokens == 0 and not pstate.in_flight
    pd.on_first_token("r1", 4.5)
    assert dstate.decoding == 1 and dstate.decoding_kv_tokens == 4001
    pd.on_finished("r1", 4.7, output_tokens=20)
    pd.on_failed("r2", 1.0)
    for core in (pd.prefill, pd.decode):
        for state in core.backends():
            assert not state.in_flight and state.pending_prefill_tokens == 0
            assert state.decoding == 0 and state.decoding_kv_tokens == 0


def test_the_prefill_side_follows_its_cache() -> None:
    pd = _pd()
    pd.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    pd.on_prefill_done("r1", 0.4, cached_tokens=0)
    pd.on_finished("r1", 5.0, output_tokens=20)
    # same prefix: p0 holds 3999 of it (n - 1 cap), p1 nothing
    decision = pd.route(_req("r2", (1, 2, 3, 4), 4000), 6.0)
    assert decision.prefill.backend == "p0"
    assert decision.prefill.predicted_cached_tokens == 3999


def test_a_slow_link_on_one_decode_server_steers_the_pair_off_it() -> None:
    pd = _pd(d0=1e5)  # d0's link is ten times slower: 40 s for 4000 tokens
    decision = pd.route(_req("r1", (1, 2, 3, 4), 4000), 0.0)
    assert decision.decode.backend == "d1"


def test_independent_mode_and_exclusions() -> None:
    pd = _pd(pair=False)
    decision = pd.route(_req("r1", (1, 2), 2000), 0.0, exclude_prefill={"p0"})
    assert decision.quote is None and decision.prefill.backend == "p1"
    with pytest.raises(NoBackendError):
        pd.route(_req("r2", (1, 2), 2000), 0.0, exclude_decode={"d0", "d1"})
    # the refused request left nothing behind on the prefill side
    assert sum(len(s.in_flight) for s in pd.prefill.backends()) == 1
    priced = _pd()
    with pytest.raises(NoBackendError):
        priced.route(_req("r3", (1,), 500), 0.0, exclude_prefill={"p0", "p1"})


def test_pair_pricing_needs_the_two_cost_policies() -> None:
    prefill = RoutingCore(make_policy("round_robin"), [BackendSpec(id="p")])
    decode = RoutingCore(make_policy("pd_decode"), [BackendSpec(id="d")])
    with pytest.raises(TypeError):
        PDRouter(prefill, decode, pair=PairConfig())


def test_decode_policy_learns_its_step_from_finished_requests() -> None:
    specs = [BackendSpec(id="d0", kv_capacity_tokens=100_000, prior=PRIOR)]
    core = RoutingCore(make_policy("pd_decode"), specs)
    policy = core.policy
    assert isinstance(policy, DecodeCostPolicy)
    for i in range(40):  # each stream's gap is 20 ms, twice the prior's ~11 ms
        rid = f"r{i}"
        core.route(_req(rid, (i,), 1000), float(i))
        core.on_first_token(rid, i + 0.1)
        core.on_finished(rid, i + 0.1 + 19 * 0.02, output_tokens=20)
    learned = policy.learned()["d0"]
    step = learned["decode_step_s"] + learned["decode_s_per_kv_token"] * 1010
    assert step == pytest.approx(0.02, rel=0.05)


def test_hold_prefill_counts_the_request_until_it_finishes_as_smg_does() -> None:
    specs = [BackendSpec(id="p0", kv_capacity_tokens=1_000_000, prior=PRIOR)]
    dspecs = [BackendSpec(id="d0", kv_capacity_tokens=100_000, prior=PRIOR)]
    pd = PDRouter(
        RoutingCore(make_policy("cache_aware"), specs),
        RoutingCore(make_policy("power_of_two"), dspecs),
        hold_prefill=True,
    )
    pd.route(_req("r1", (1, 2), 2000), 0.0)
    (pstate,) = pd.prefill.backends()
    pd.on_prefill_done("r1", 0.2, cached_tokens=0)
    assert pstate.load == 1  # still counted: SMG's load guard lives as long as the response
    pd.on_first_token("r1", 0.3)
    pd.on_finished("r1", 0.5, output_tokens=20)
    assert pstate.load == 0
    pd.route(_req("r2", (1, 2), 2000), 1.0)
    pd.on_prefill_done("r2", 1.2)
    pd.on_failed("r2", 1.3)
    assert pstate.load == 0 and pd.prefill.stats()["in_flight"] == 0


def _held_pd(decodes: tuple[str, ...] = ("d0", "d1"), capacity: int = 1000) -> PDRouter:
    specs = [BackendSpec(id="p0", kv_capacity_tokens=1_000_000, prior=PRIOR)]
    dspecs = [BackendSpec(id=b, kv_capacity_tokens=capacity, prior=PRIOR) for b in decodes]
    return PDRouter(
        RoutingCore(make_policy("cost", interference=0.0, calibrate=False), specs),
        RoutingCore(make_policy("pd_decode"), dspecs),
        pair=PairConfig(kv_bytes_per_token=1000, link_bytes_per_s=1e9),
        room_hold=True,
    )


def _need(rid: str, need: int, blocks: tuple[int, ...]) -> RouteRequest:
    return _req(rid, blocks, need - 20)  # max_tokens 20: the room is prompt + 20


def test_held_requests_are_released_by_wait_per_token_of_room() -> None:
    pd = _held_pd()
    first = pd.submit(_need("r1", 700, (1,)), 0.0)
    second = pd.submit(_need("r2", 700, (2,)), 0.0)
    assert first is not None and second is not None
    assert {first.decode.backend, second.decode.backend} == {"d0", "d1"}  # 300 left on each
    assert pd.submit(_need("r3", 500, (3,)), 1.0) is None  # fits nowhere
    assert pd.submit(_need("r4", 400, (4,)), 2.0) is None
    assert pd.submit(_need("r5", 100, (5,)), 3.0) is None  # fits, but others wait first
    assert pd.held == 3
    # at 4.0, wait per token of room: r5 1/100 = 0.01 leads r3 3/500 and r4 2/400; r5 fits,
    # r3 does not (300 free on each server), and nothing passes it
    early = pd.release(4.0)
    assert [req.rid for req, _ in early] == ["r5"]
    pd.on_finished("r1", 5.0, output_tokens=20)  # 1000 free on r1's server
    released = early + pd.release(5.0)
    # at 5.0: r3 4/500 = 0.008 before r4 3/400 = 0.0075
    assert [req.rid for req, _ in released] == ["r5", "r3", "r4"]
    assert pd.held == 0
    committed = {"d0": 0, "d1": 0}
    committed[second.decode.backend] = 700
    for req, decision in released:
        committed[decision.decode.backend] += req.prompt_tokens + 20
    assert max(committed.values()) <= 1000  # no decode server over its pool


def test_a_long_waiting_large_request_leads_and_room_collects_for_it() -> None:
    pd = _held_pd(decodes=("d0",))
    assert pd.submit(_need("r1", 800, (1,)), 0.0) is not None
    assert pd.submit(_need("big", 900, (2,)), 0.0) is None
    assert pd.submit(_need("small", 100, (3,)), 9.5) is None
    # at 10: big 10/900 = 0.011 leads small 0.5/100 = 0.005; big does not fit, so small
    # (which would) waits behind it
    assert pd.release(10.0) == []
    pd.on_finished("r1", 10.0, output_tokens=20)
    assert [req.rid for req, _ in pd.release(10.0)] == ["big", "small"]  # 900 + 100


def test_a_held_request_can_be_cancelled_and_failures_free_room() -> None:
    pd = _held_pd(decodes=("d0",))
    assert pd.submit(_need("r1", 800, (1,)), 0.0) is not None
    assert pd.submit(_need("r2", 300, (2,)), 0.0) is None
    assert pd.cancel("r2") and not pd.cancel("r2")
    assert pd.stats()["held_for_decode_room"] == 0
    pd.on_failed("r1", 1.0)  # its room goes back
    assert pd.submit(_need("r3", 1000, (3,)), 1.0) is not None


def test_without_room_hold_submit_routes_at_once() -> None:
    pd = _pd()  # two decode servers of 100,000 tokens
    for k in range(3):  # the third fits nowhere: sent all the same, to wait at the server
        blocks = tuple(range(100 * k, 100 * k + 90))
        assert pd.submit(_req(f"r{k}", blocks, 90_000, max_tokens=5_000), 0.0) is not None
    assert pd.held == 0


def test_a_server_coming_back_releases_what_waits_for_it() -> None:
    pd = _held_pd()
    pd.decode.set_healthy("d1", False)
    assert pd.submit(_need("r1", 800, (1,)), 0.0) is not None  # on d0, the only one up
    assert pd.submit(_need("r2", 500, (2,)), 1.0) is None  # 200 left on d0
    assert pd.release(2.0) == []  # nothing freed, nothing came back
    pd.decode.set_healthy("d1", True)
    assert pd.release(3.0) == []  # the core was not told: it does not look again
    pd.backends_changed()
    [(req, decision)] = pd.release(3.0)
    assert (req.rid, decision.decode.backend) == ("r2", "d1")
    # the prefill side too: a leader that fits but has no prefill server waits for one
    assert pd.submit(_need("r3", 600, (3,)), 4.0) is None  # 200 + 500 used: no room
    pd.prefill.set_healthy("p0", False)
    pd.on_finished("r1", 5.0, output_tokens=20)  # room on d0, but no prefill server
    assert pd.release(5.0) == [] and pd.held == 1
    pd.prefill.set_healthy("p0", True)
    assert pd.release(5.5) == []
    pd.backends_changed()
    assert [req.rid for req, _ in pd.release(6.0)] == ["r3"]


def _slo_pd(tpot_slo_s: float | None) -> PDRouter:
    specs = [BackendSpec(id="p0", kv_capacity_tokens=1_000_000, prior=PRIOR)]
    dspecs = [BackendSpec(id=b, kv_capacity_tokens=100_000, prior=PRIOR) for b in ("d0", "d1")]
    return PDRouter(
        RoutingCore(make_policy("cost", interference=0.0, calibrate=False), specs),
        RoutingCore(make_policy("pd_decode"), dspecs),
        pair=PairConfig(kv_bytes_per_token=1000, link_bytes_per_s=1e9),
        room_hold=True,
        tpot_slo_s=tpot_slo_s,
    )


def test_a_tpot_slo_holds_requests_whose_predicted_step_would_pass_it() -> None:
    # step = 10 ms + 1 us per KV token of the batch the request would join (its prompt, half
    # its 20 expected tokens, and the prompts on their way there): 11.5 ms allows 1500 tokens
    pd = _slo_pd(0.0115)
    assert pd.submit(_req("r1", (1,), 900), 0.0).decode.backend == "d0"  # type: ignore[union-attr]
    # d0: 900 + 900 + 10 = 1810 tokens, 11.81 ms: over; d1 is empty
    assert pd.submit(_req("r2", (2,), 900), 0.0).decode.backend == "d1"  # type: ignore[union-attr]
    # 900 + 700 + 10 = 1610 on either: held, though both have KV room for it
    assert pd.submit(_req("r3", (3,), 700), 1.0) is None
    assert pd.submit(_req("r4", (4,), 100), 2.0) is None  # fits, but r3 waits first
    # at 2.5: r4 0.5/120 leads r3 1.5/720 and fits beside r1: 900 + 100 + 10, 11.01 ms
    assert [(req.rid, d.decode.backend) for req, d in pd.release(2.5)] == [("r4", "d0")]
    assert pd.release(2.6) == [] and pd.held == 1  # nothing changed for r3
    pd.on_finished("r1", 3.0, output_tokens=20)
    # d0 holds r4 alone now: 100 + 700 + 10 = 810 tokens, 10.81 ms (d1: 1610, over)
    assert [(req.rid, d.decode.backend) for req, d in pd.release(3.0)] == [("r3", "d0")]
    # too large for the SLO anywhere: it waits for a server with nothing in flight
    assert pd.submit(_req("big", (5, 6, 7, 8, 9), 5000), 4.0) is None
    pd.on_finished("r2", 5.0, output_tokens=20)
    assert [(req.rid, d.decode.backend) for req, d in pd.release(5.0)] == [("big", "d1")]


def test_without_a_tpot_slo_the_same_requests_go_at_once() -> None:
    pd = _slo_pd(None)
    for k, prompt in enumerate((900, 900, 700, 100, 5000)):
        blocks = tuple(range(10 * k, 10 * k + 5))
        assert pd.submit(_req(f"r{k}", blocks, prompt), 0.0) is not None


def test_a_tpot_slo_needs_the_pair_and_the_hold() -> None:
    specs = [BackendSpec(id="p0", prior=PRIOR)]
    dspecs = [BackendSpec(id="d0", prior=PRIOR)]
    cost = make_policy("cost", calibrate=False)
    with pytest.raises(ValueError, match="pair price and the room hold"):
        PDRouter(
            RoutingCore(cost, specs),
            RoutingCore(make_policy("pd_decode"), dspecs),
            pair=PairConfig(),
            tpot_slo_s=0.02,
        )
    with pytest.raises(ValueError, match="positive"):
        _slo_pd(0.0)
