"""RoutingCore bookkeeping: loads follow each request's life, which ends exactly once."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import pytest

from router.core.model import BackendSpec, BackendState, BasePolicy, Choice, RequestRecord
from router.core.model import RouteRequest as RR
from router.core.policies import make_policy
from router.core.routing import Decision, NoBackendError, RoutingCore


def req(rid: str, prompt: int = 100, blocks: tuple[int, ...] = (1, 2, 3, 4, 5)) -> RR:
    return RR(rid=rid, blocks=blocks, block_tokens=64, prompt_tokens=prompt)


def specs(*ids: str) -> list[BackendSpec]:
    return [BackendSpec(id=i) for i in ids]


class Recorder(BasePolicy):
    """Routes to a fixed preference order and records every hook call."""

    name = "recorder"

    def __init__(self, prefer: Sequence[str] = ()) -> None:
        super().__init__()
        self.prefer = list(prefer)
        self.calls: list[tuple[str, str]] = []
        self.offered: list[list[str]] = []

    def choose(self, req: RR, backends: Sequence[BackendState], now: float) -> Choice:
        ids = [b.id for b in backends]
        self.offered.append(ids)
        pick = next((p for p in self.prefer if p in ids), ids[0])
        return Choice(backend=pick, predicted_cached_tokens=7, predicted_ttft_s=0.5, reason="r")

    def on_routed(self, rec: RequestRecord, now: float) -> None:
        self.calls.append(("routed", rec.request.rid))

    def on_first_token(self, rec: RequestRecord, now: float) -> None:
        self.calls.append(("first", rec.request.rid))

    def on_finished(self, rec: RequestRecord, now: float, output_tokens: int) -> None:
        self.calls.append(("finished", rec.request.rid))

    def on_failed(self, rec: RequestRecord, now: float) -> None:
        self.calls.append(("failed", rec.request.rid))

    def on_backend_added(self, spec: BackendSpec) -> None:
        self.calls.append(("added", spec.id))

    def on_backend_removed(self, backend_id: str) -> None:
        self.calls.append(("removed", backend_id))


def state(core: RoutingCore, bid: str) -> BackendState:
    return next(s for s in core.backends() if s.id == bid)


def test_loads_rise_on_route_and_move_through_first_token_to_finish() -> None:
    policy = Recorder(prefer=["b"])
    core = RoutingCore(policy, specs("a", "b"))
    decision = core.route(req("r1", prompt=100), now=1.0)
    assert decision == Decision(
        backend="b", predicted_cached_tokens=7, predicted_ttft_s=0.5, reason="r"
    )
    b = state(core, "b")
    assert (b.load, b.pending_prefill_tokens, b.decoding, b.decoding_kv_tokens) == (1, 100, 0, 0)
    rec = core.record("r1")
    assert rec is not None and rec.backend == "b" and rec.routed_at == 1.0

    core.on_first_token("r1", now=1.2, cached_tokens=64)
    assert (b.load, b.pending_prefill_tokens, b.decoding, b.decoding_kv_tokens) == (1, 0, 1, 101)
    assert rec.first_token_at == 1.2 and rec.cached_tokens == 64

    core.on_finished("r1", now=2.0, output_tokens=10)
    assert (b.load, b.pending_prefill_tokens, b.decoding, b.decoding_kv_tokens) == (0, 0, 0, 0)
    assert core.record("r1") is None
    assert policy.calls[-3:] == [("routed", "r1"), ("first", "r1"), ("finished", "r1")]


def test_failed_before_first_token_gives_back_pending_prefill() -> None:
    core = RoutingCore(Recorder(), specs("a"))
    core.route(req("r1", prompt=300), 0.0)
    core.route(req("r2", prompt=50), 0.0)
    a = state(core, "a")
    assert (a.load, a.pending_prefill_tokens) == (2, 350)
    core.on_failed("r1", 0.5)
    assert (a.load, a.pending_prefill_tokens) == (1, 50)
    core.on_first_token("r2", 0.6)
    core.on_failed("r2", 0.7)
    assert (a.load, a.pending_prefill_tokens, a.decoding, a.decoding_kv_tokens) == (0, 0, 0, 0)


def test_each_request_ends_exactly_once_and_late_events_are_ignored() -> None:
    policy = Recorder()
    core = RoutingCore(policy, specs("a"))
    core.route(req("r1"), 0.0)
    core.on_finished("r1", 1.0, output_tokens=5)
    core.on_failed("r1", 1.1)  # the proxy's abort path racing the finish
    core.on_finished("r1", 1.2, output_tokens=5)
    core.on_first_token("r1", 1.3)
    core.on_first_token("never-routed", 1.3)
    core.on_finished("never-routed", 1.3, output_tokens=1)
    core.on_failed("never-routed", 1.3)
    ends = [c for c in policy.calls if c[0] in ("finished", "failed", "first")]
    assert ends == [("finished", "r1")]
    a = state(core, "a")
    assert (a.load, a.pending_prefill_tokens, a.decoding) == (0, 0, 0)
    stats = core.stats()["backends"]["a"]
    assert (stats["routed"], stats["finished"], stats["failed"]) == (1, 1, 0)


def test_duplicate_first_token_counts_once() -> None:
    core = RoutingCore(Recorder(), specs("a"))
    core.route(req("r1", prompt=10), 0.0)
    core.on_first_token("r1", 0.1)
    core.on_first_token("r1", 0.2)
    a = state(core, "a")
    assert (a.pending_prefill_tokens, a.decoding, a.decoding_kv_tokens) == (0, 1, 11)


def test_rid_unique_in_flight_but_reusable_after_it_ends() -> None:
    core = RoutingCore(Recorder(), specs("a", "b"))
    core.route(req("r1"), 0.0)
    with pytest.raises(ValueError, match="already in flight"):
        core.route(req("r1"), 0.0)
    core.on_failed("r1", 0.1)  # retry elsewhere: same rid, first backend excluded
    decision = core.route(req("r1"), 0.2, exclude={"a"})
    assert decision.backend == "b"
    assert state(core, "a").load == 0 and state(core, "b").load == 1


def test_exclude_unhealthy_and_draining_are_never_offered() -> None:
    policy = Recorder()
    core = RoutingCore(policy, specs("a", "b", "c", "d"))
    core.set_healthy("a", False)
    core.set_draining("b", True)
    for i in range(5):
        assert core.route(req(f"r{i}"), 0.0, exclude=["c"]).backend == "d"
    assert all(offered == ["d"] for offered in policy.offered)
    core.set_healthy("a", True)
    core.set_draining("b", False)
    core.route(req("x"), 0.0)
    assert policy.offered[-1] == ["a", "b", "c", "d"]


def test_no_routable_backend_raises_and_records_nothing() -> None:
    core = RoutingCore(Recorder())
    with pytest.raises(NoBackendError):
        core.route(req("r1"), 0.0)
    core.add_backend(BackendSpec(id="a"))
    core.set_healthy("a", False)
    with pytest.raises(NoBackendError):
        core.route(req("r1"), 0.0)
    core.set_healthy("a", True)
    with pytest.raises(LookupError):  # NoBackendError is a LookupError
        core.route(req("r1"), 0.0, exclude=("a",))
    assert core.record("r1") is None and core.stats()["in_flight"] == 0


def test_policy_choosing_an_unoffered_backend_is_a_broken_contract() -> None:
    core = RoutingCore(Recorder(prefer=["a"]), specs("a", "b"))
    core.set_draining("a", True)

    class Stubborn(Recorder):
        def choose(self, req: RR, backends: Sequence[BackendState], now: float) -> Choice:
            return Choice(backend="a")

    core.policy = Stubborn()
    with pytest.raises(RuntimeError, match="not among the routable"):
        core.route(req("r1"), 0.0)
    assert core.record("r1") is None


def test_add_replaces_spec_keeps_state_and_remove_keeps_in_flight_records() -> None:
    policy = Recorder()
    core = RoutingCore(policy, specs("a"))
    core.route(req("r1", prompt=40), 0.0)
    core.add_backend(BackendSpec(id="a", kv_capacity_tokens=1000))
    a = state(core, "a")
    assert a.spec.kv_capacity_tokens == 1000 and a.load == 1
    core.remove_backend("a")
    assert core.backends() == () and core.record("r1") is not None
    core.add_backend(BackendSpec(id="a"))  # a fresh "a": the old request is not its load
    assert state(core, "a").load == 0
    core.on_finished("r1", 1.0, output_tokens=3)
    assert state(core, "a").load == 0 and state(core, "a").pending_prefill_tokens == 0
    assert core.stats()["backends"]["a"]["finished"] == 0
    assert ("removed", "a") in policy.calls and policy.calls.count(("added", "a")) == 3
    assert ("finished", "r1") in policy.calls


def test_unknown_backend_in_admin_calls_is_a_clear_error() -> None:
    core = RoutingCore(Recorder(), specs("a"))
    calls: list[Callable[[], None]] = [
        lambda: core.remove_backend("zz"),
        lambda: core.set_healthy("zz", True),
        lambda: core.set_draining("zz", True),
        lambda: core.set_reported_load("zz", 1, 2),
    ]
    for call in calls:
        with pytest.raises(KeyError, match="zz"):
            call()


def test_stats_are_json_able_and_compare_predicted_with_reported() -> None:
    core = RoutingCore(make_policy("cache_aware"), specs("a", "b"))
    core.set_reported_load("a", 3, 4)
    r1 = RR(rid="r1", blocks=(1, 2, 3), block_tokens=64, prompt_tokens=192)
    core.route(r1, 0.0)
    core.on_finished("r1", 1.0, output_tokens=5, cached_tokens=0)
    r2 = RR(rid="r2", blocks=(1, 2, 3, 4), block_tokens=64, prompt_tokens=256)
    decision = core.route(r2, 2.0)
    assert decision.backend == "a" and decision.predicted_cached_tokens == 192
    core.on_first_token("r2", 2.1, cached_tokens=128)
    core.on_finished("r2", 3.0, output_tokens=5)
    core.route(RR(rid="r3", blocks=(9,), block_tokens=64, prompt_tokens=10), 4.0)
    stats = json.loads(json.dumps(core.stats()))
    a = stats["backends"]["a"]
    assert stats["policy"] == "cache_aware" and stats["in_flight"] == 1
    assert (a["routed"], a["finished"], a["reported_requests"]) == (3, 2, 2)
    assert a["predicted_cached_tokens"] == 192
    assert a["predicted_cached_tokens_reported"] == 192
    assert a["reported_cached_tokens"] == 128
    assert a["prompt_tokens_reported"] == 448
    assert (a["reported_running"], a["reported_waiting"]) == (3, 4)
    assert a["load"] == 1 and a["pending_prefill_tokens"] == 10
    assert stats["policy_stats"]["decisions"]["cache_hit"] == 1
