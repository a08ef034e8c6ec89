"""Baseline policies: distribution, seeded determinism, stickiness, and the registry."""

from __future__ import annotations

import random
from collections import Counter
from typing import ClassVar

import pytest

from router.core.model import BackendSpec, BasePolicy, Policy, RouteRequest
from router.core.policies import (
    POLICIES,
    LeastLoadPolicy,
    SessionPolicy,
    make_policy,
    register_policy,
)
from router.core.routing import RoutingCore

IDS = [f"b{i}" for i in range(4)]


def core_for(name: str, ids: list[str] = IDS, seed: int = 0, **options: object) -> RoutingCore:
    policy = make_policy(name, rng=random.Random(seed), **options)
    return RoutingCore(policy, [BackendSpec(id=i) for i in ids])


def rr(rid: str, session: str | None = None, blocks: tuple[int, ...] = (1,)) -> RouteRequest:
    return RouteRequest(
        rid=rid, blocks=blocks, block_tokens=64, prompt_tokens=len(blocks) * 64,
        session_key=session,
    )  # fmt: skip


def route_finished(core: RoutingCore, n: int, prefix: str = "r") -> list[str]:
    """Route n requests that each end before the next arrives (all loads 0 at routing)."""
    out = []
    for i in range(n):
        out.append(core.route(rr(f"{prefix}{i}"), float(i)).backend)
        core.on_finished(f"{prefix}{i}", float(i) + 0.5, output_tokens=1)
    return out


def test_registry_lists_baselines_and_rejects_unknown_names_and_options() -> None:
    for name in ("round_robin", "random", "least_load", "power_of_two", "session", "cache_aware"):
        assert name in POLICIES
        policy = make_policy(name)
        assert isinstance(policy, Policy) and policy.name == name
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; known: .*round_robin"):
        make_policy("nope")
    with pytest.raises(ValueError, match=r"unknown option.*bogus.*known: tie_break"):
        make_policy("least_load", bogus=1)
    with pytest.raises(ValueError, match="takes no options"):
        make_policy("round_robin", x=1)
    with pytest.raises(ValueError, match="tie_break"):
        make_policy("least_load", tie_break="last")


def test_register_policy_adds_a_class_and_refuses_a_taken_name() -> None:
    @register_policy
    class Always(BasePolicy):
        name: ClassVar[str] = "test_always_first"

        def choose(self, req, backends, now):  # type: ignore[no-untyped-def]
            from router.core.model import Choice

            return Choice(backend=backends[0].id)

    try:
        assert isinstance(make_policy("test_always_first"), Always)

        class Impostor(BasePolicy):
            name: ClassVar[str] = "round_robin"

        with pytest.raises(ValueError, match="taken"):
            register_policy(Impostor)

        class Nameless(BasePolicy):
            pass

        with pytest.raises(ValueError, match="needs its own"):
            register_policy(Nameless)
    finally:
        POLICIES.pop("test_always_first", None)


def test_round_robin_cycles_over_routable_backends() -> None:
    core = core_for("round_robin")
    assert route_finished(core, 8) == IDS + IDS
    core.set_healthy("b1", False)
    picks = route_finished(core, 6, prefix="x")
    assert set(picks) == {"b0", "b2", "b3"} and Counter(picks) == Counter(
        {"b0": 2, "b2": 2, "b3": 2}
    )


def test_random_is_uniform_and_seeded() -> None:
    picks = route_finished(core_for("random", seed=7), 4000)
    counts = Counter(picks)
    assert set(counts) == set(IDS)
    assert all(850 < c < 1150 for c in counts.values()), counts
    assert route_finished(core_for("random", seed=7), 200) == picks[:200]
    assert route_finished(core_for("random", seed=8), 200) != picks[:200]


def test_least_load_takes_the_fewest_in_flight() -> None:
    core = core_for("least_load", tie_break="first")
    # Nothing finishes: each request goes to the emptiest backend, so loads stay level.
    picks = [core.route(rr(f"r{i}"), 0.0).backend for i in range(8)]
    assert picks == IDS + IDS
    core.on_finished("r6", 1.0, output_tokens=1)  # b2 drops to 1
    assert core.route(rr("n"), 1.0).backend == "b2"
    loads = {s.id: s.load for s in core.backends()}
    assert loads == {"b0": 2, "b1": 2, "b2": 2, "b3": 2}


def test_least_load_random_tie_break_is_seeded_and_spreads() -> None:
    a = route_finished(core_for("least_load", seed=3), 400)
    b = route_finished(core_for("least_load", seed=3), 400)
    assert a == b
    assert all(70 < c < 130 for c in Counter(a).values())
    first = route_finished(core_for("least_load", tie_break="first"), 10)
    assert first == ["b0"] * 10
    assert LeastLoadPolicy().config.tie_break == "random"  # the default spreads ties


def test_power_of_two_prefers_the_less_loaded_of_two() -> None:
    core = core_for("power_of_two", seed=1)
    # Pile 10 in-flight requests on b0 by draining everyone else, then reopen them.
    for bid in ("b1", "b2", "b3"):
        core.set_draining(bid, True)
    for i in range(10):
        core.route(rr(f"hot{i}"), 0.0)
    for bid in ("b1", "b2", "b3"):
        core.set_draining(bid, False)
    picks = route_finished(core, 300)
    counts = Counter(picks)
    # b0 is picked only when both draws are b0 (impossible: draws are distinct).
    assert counts["b0"] == 0
    assert all(70 < counts[b] < 130 for b in ("b1", "b2", "b3")), counts
    again = core_for("power_of_two", seed=1)
    assert route_finished(again, 50) == route_finished(core_for("power_of_two", seed=1), 50)


def test_power_of_two_with_one_backend() -> None:
    core = core_for("power_of_two", ids=["only"])
    assert route_finished(core, 3) == ["only"] * 3


def test_session_is_sticky_and_spreads_keys() -> None:
    core = core_for("session")
    first = {}
    for k in range(400):
        first[k] = core.route(rr(f"a{k}", session=f"user-{k}"), 0.0).backend
        core.on_finished(f"a{k}", 0.1, output_tokens=1)
    for k in range(400):
        assert core.route(rr(f"b{k}", session=f"user-{k}"), 1.0).backend == first[k]
        core.on_finished(f"b{k}", 1.1, output_tokens=1)
    counts = Counter(first.values())
    assert set(counts) == set(IDS) and all(60 < c < 140 for c in counts.values()), counts
    # Another router process (same ring, unsalted hash) maps keys the same way.
    other = core_for("session", seed=99)
    assert all(
        other.route(rr(f"c{k}", session=f"user-{k}"), 0.0).backend == first[k] for k in range(50)
    )


def test_session_removal_moves_only_the_removed_backends_keys() -> None:
    core = core_for("session", ids=[f"b{i}" for i in range(5)])
    keys = [f"k{i}" for i in range(500)]
    before = {}
    for i, k in enumerate(keys):
        before[k] = core.route(rr(f"r{i}", session=k), 0.0).backend
        core.on_failed(f"r{i}", 0.0)
    core.remove_backend("b2")
    moved = 0
    for i, k in enumerate(keys):
        after = core.route(rr(f"s{i}", session=k), 1.0).backend
        core.on_failed(f"s{i}", 1.0)
        if before[k] == "b2":
            assert after != "b2"
            moved += 1
        else:
            assert after == before[k]
    assert 50 < moved < 150  # about a fifth of the keys lived on b2
    # Unhealthy is temporary: its keys go elsewhere meanwhile and come back after.
    core.set_healthy("b0", False)
    k0 = next(k for k in keys if before[k] == "b0")
    assert core.route(rr("u1", session=k0), 2.0).backend != "b0"
    core.set_healthy("b0", True)
    assert core.route(rr("u2", session=k0), 3.0).backend == "b0"


def test_session_adding_a_backend_takes_a_fair_share_only_from_the_others() -> None:
    policy = SessionPolicy()
    ids = [f"b{i}" for i in range(4)]
    for bid in ids:
        policy.on_backend_added(BackendSpec(id=bid))
    before = {f"k{i}": policy.owner(f"k{i}", ids) for i in range(1000)}
    policy.on_backend_added(BackendSpec(id="b4"))
    after = {k: policy.owner(k, [*ids, "b4"]) for k in before}
    changed = [k for k in before if before[k] != after[k]]
    assert all(after[k] == "b4" for k in changed)
    assert 120 < len(changed) < 280  # about a fifth


def test_session_falls_back_to_prefix_blocks_then_round_robin() -> None:
    core = core_for("session", prefix_blocks=2)
    # Same first two blocks -> same backend, whatever follows.
    picks = {core.route(rr(f"p{i}", blocks=(11, 22, 100 + i)), 0.0).backend for i in range(20)}
    assert len(picks) == 1
    prefixes = {core.route(rr(f"q{i}", blocks=(11, 1000 + i, 5)), 0.0).backend for i in range(40)}
    assert len(prefixes) > 1  # the second block differs: keys spread
    empty = [
        core.route(RouteRequest(rid=f"e{i}", blocks=(), block_tokens=64, prompt_tokens=0), 0.0)
        for i in range(8)
    ]
    assert [d.backend for d in empty] == IDS + IDS
    assert {d.reason for d in empty} == {"round_robin"}
    with pytest.raises(ValueError):
        make_policy("session", virtual_nodes=0)
