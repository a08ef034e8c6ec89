"""cache_aware follows each branch of sglang-router 0.3.2's rule, boundaries included."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from router.core.cache_aware import BlockTrees, CacheAwareConfig, CacheAwarePolicy
from router.core.model import BackendSpec, RouteRequest
from router.core.policies import make_policy
from router.core.routing import RoutingCore

BT = 64


def rq(rid: str, blocks: tuple[int, ...], prompt: int | None = None, bt: int = BT) -> RouteRequest:
    n = len(blocks) * bt if prompt is None else prompt
    return RouteRequest(rid=rid, blocks=blocks, block_tokens=bt, prompt_tokens=n)


def make(ids: tuple[str, ...] = ("a", "b"), **options: Any) -> RoutingCore:
    options.setdefault("eviction_interval_s", 0)
    return RoutingCore(make_policy("cache_aware", **options), [BackendSpec(id=i) for i in ids])


def policy_of(core: RoutingCore) -> CacheAwarePolicy:
    assert isinstance(core.policy, CacheAwarePolicy)
    return core.policy


def hold(core: RoutingCore, backend: str, n: int, start: float = 0.0) -> None:
    """Put n unrelated in-flight requests on `backend` (others drained meanwhile)."""
    others = [s.id for s in core.backends() if s.id != backend]
    for bid in others:
        core.set_draining(bid, True)
    for i in range(n):
        core.route(rq(f"hold-{backend}-{start}-{i}", (10_000_000 + i + int(start) * 1000,)), start)
    for bid in others:
        core.set_draining(bid, False)


def finish(core: RoutingCore, rid: str, now: float = 0.0) -> None:
    core.on_finished(rid, now, output_tokens=1)


def test_defaults_are_sglang_router_0_3_2_cli_defaults() -> None:
    RouterArgs = pytest.importorskip("sglang_router.router_args").RouterArgs  # the 0.3.2 wheel

    cfg = CacheAwareConfig()
    assert cfg.cache_threshold == RouterArgs.cache_threshold == 0.3
    assert cfg.balance_abs_threshold == RouterArgs.balance_abs_threshold == 64
    assert cfg.balance_rel_threshold == RouterArgs.balance_rel_threshold == 1.5
    assert cfg.eviction_interval_s == RouterArgs.eviction_interval_secs == 60
    assert cfg.max_tree_size == RouterArgs.max_tree_size == 2**26
    with pytest.raises(ValueError):
        CacheAwareConfig(cache_threshold=1.5)


def test_high_match_goes_to_the_deepest_match_even_when_more_loaded() -> None:
    core = make()
    d = core.route(rq("seed", (1, 2, 3, 4)), 0.0)
    assert (d.backend, d.reason) == ("a", "cache_miss")  # all idle: first backend
    hold(core, "a", 10)  # a: 11 in flight, b: 0 -> gap 11, not imbalanced
    d = core.route(rq("r", (1, 2, 3, 9)), 1.0)
    assert (d.backend, d.reason, d.predicted_cached_tokens) == ("a", "cache_hit", 3 * BT)


def test_imbalance_goes_to_least_loaded_and_the_abs_boundary_is_strict() -> None:
    core = make()
    core.route(rq("seed", (1, 2)), 0.0)
    finish(core, "seed")
    hold(core, "a", 64)  # gap exactly 64: balanced, affinity wins
    d = core.route(rq("r64", (1, 2)), 1.0)
    assert (d.backend, d.reason) == ("a", "cache_hit")  # a now has 65 in flight
    d = core.route(rq("r65", (1, 2)), 2.0)  # gap 65 > 64 and 65 > 0 * 1.5: imbalanced
    assert (d.backend, d.reason) == ("b", "imbalanced")
    # Inserted at once under b, in the imbalanced branch too.
    assert policy_of(core).trees.depth("b", (1, 2)) == 2
    assert d.predicted_cached_tokens == 0  # b held nothing when it was chosen


def test_imbalance_needs_the_relative_condition_too_strictly() -> None:
    core = make()
    core.route(rq("seed", (1, 2)), 0.0)
    hold(core, "b", 130)
    hold(core, "a", 194, start=1)  # a: 195 with seed, b: 130 -> 195 == 130 * 1.5: balanced
    d = core.route(rq("eq", (1, 2)), 2.0)
    assert (d.backend, d.reason) == ("a", "cache_hit")
    d = core.route(rq("gt", (1, 2)), 3.0)  # a: 196 > 195 and gap 66 > 64: imbalanced
    assert (d.backend, d.reason) == ("b", "imbalanced")


def test_low_match_goes_to_least_loaded_not_to_the_smallest_tree() -> None:
    core = make(("a", "b", "c"))
    for i in range(5):  # a collects a big tree; b and c stay empty
        d = core.route(rq(f"big{i}", tuple(range(100 * i, 100 * i + 20))), float(i))
        assert (d.backend, d.reason) == ("a", "cache_miss")  # ties: first in order
        finish(core, f"big{i}")
    hold(core, "a", 3, start=10)
    hold(core, "c", 1, start=11)
    d = core.route(rq("new", (555, 556)), 12.0)
    assert (d.backend, d.reason) == ("b", "cache_miss")


def test_match_rate_boundary_is_strictly_greater() -> None:
    core = make()
    core.route(rq("s", tuple(range(1, 11))), 0.0)  # a holds blocks 1..10
    finish(core, "s")
    hold(core, "b", 1)  # b busier, so a miss would pick a: make a the one to avoid
    hold(core, "a", 2, start=1)  # a: 2, b: 1 -> a miss goes to b
    exactly = rq("x", (1, 2, 3, 90, 91, 92, 93, 94, 95, 96))  # 192 / 640 == 0.3
    d = core.route(exactly, 1.0)
    assert (d.backend, d.reason) == ("b", "cache_miss")
    above = rq("y", (1, 2, 3, 80, 81, 82, 83, 84, 85, 86), prompt=639)  # 192 / 639 > 0.3
    d = core.route(above, 2.0)
    assert (d.backend, d.reason) == ("a", "cache_hit")


def test_match_rate_is_compared_in_f32_like_rust() -> None:
    # 3,000,001 / 10,000,003 = 0.3 + 1e-8: above 0.3 in f64, but rounds to f32(0.3) in f32.
    bt = 3_000_001
    core = make()
    core.route(rq("s", (1, 2, 3, 4), prompt=4 * bt, bt=bt), 0.0)
    finish(core, "s")
    hold(core, "a", 1)  # a miss goes to b
    d = core.route(rq("x", (1, 7, 8, 9), prompt=10_000_003, bt=bt), 1.0)
    assert 3_000_001 / 10_000_003 > 0.3
    assert (d.backend, d.reason) == ("b", "cache_miss")


def test_deepest_holder_tie_goes_to_the_first_inserter() -> None:
    core = make()
    core.set_draining("a", True)
    core.route(rq("first", (1, 2, 3)), 0.0)  # only b is offered: b inserts first
    core.set_draining("a", False)
    core.set_draining("b", True)
    d = core.route(rq("second", (1, 2, 3)), 1.0)  # holder b not offered: first routable, a
    assert (d.backend, d.reason) == ("a", "holder_unroutable")
    core.set_draining("b", False)
    for rid in ("first", "second"):
        finish(core, rid)
    trees = policy_of(core).trees
    assert trees.depth("a", (1, 2, 3)) == trees.depth("b", (1, 2, 3)) == 3
    d = core.route(rq("third", (1, 2, 3, 4)), 2.0)
    assert (d.backend, d.reason) == ("b", "cache_hit")


def test_removed_backend_loses_its_tree() -> None:
    core = make()
    core.route(rq("s", (1, 2, 3)), 0.0)
    finish(core, "s")
    core.remove_backend("a")
    assert policy_of(core).trees.match((1, 2, 3)).blocks == 0
    assert core.route(rq("t", (1, 2, 3)), 1.0).reason == "cache_miss"


def test_eviction_runs_every_interval_of_now_and_drops_lru_leaves_past_max_size() -> None:
    """Everything on one backend, so the LRU order among its chains is visible."""
    core = make(("a",), max_tree_size=3 * BT, eviction_interval_s=10)
    trees = policy_of(core).trees
    for t, (rid, blocks) in enumerate([("p", (1, 2)), ("q", (5, 6)), ("s", (1, 2, 3))]):
        core.route(rq(rid, blocks), float(t))
        finish(core, rid, float(t) + 0.5)
    assert trees.sizes["a"] == 5 * BT
    core.route(rq("early", (77,)), 9.5)  # not yet: 6 blocks now, past the bound
    finish(core, "early", 9.6)
    assert trees.sizes["a"] == 6 * BT
    d = core.route(rq("late", (1, 2, 3)), 10.0)  # at the boundary: evict, then route
    # LRU leaves go first until a holds <= 3 blocks: 6 (q), then its parent 5 (now a leaf,
    # same stamp), then 3 (used at t=2); 77 (used at 9.5) and the shared 1, 2 stay.
    assert d.predicted_cached_tokens == 2 * BT  # block 3 was evicted before routing
    assert trees.depth("a", (5,)) == 0 and trees.depth("a", (77,)) == 1
    assert trees.sizes["a"] == 4 * BT  # 1, 2, 77, and 3 inserted again by "late"
    assert policy_of(core).evictions == 1
    finish(core, "late", 10.5)
    core.route(rq("next", (1,)), 19.9)
    assert policy_of(core).evictions == 1  # the next one is due at 20
    core.route(rq("due", (1,)), 20.0)
    assert policy_of(core).evictions == 2 and trees.sizes["a"] == 3 * BT


def test_block_trees_eviction_keeps_prefix_closure_and_counts_partial_blocks() -> None:
    trees = BlockTrees()
    trees.insert("a", rq("x", (1, 2, 3), prompt=150))  # 64 + 64 + 22 tokens
    assert trees.sizes["a"] == 150
    trees.insert("a", rq("y", (1, 2, 4, 5)))  # shares 1, 2
    assert trees.sizes["a"] == 150 + 128
    removed = trees.evict("a", 256)  # LRU leaf is 3 (x is older than y)
    assert removed == 22 and trees.depth("a", (1, 2, 3)) == 2 and trees.sizes["a"] == 256
    trees.evict("a", 64)  # y's chain goes leaf by leaf; 1 stays while a child remains
    assert trees.sizes["a"] == 64 and trees.depth("a", (1, 2, 4, 5)) == 1
    assert trees.match((1, 9)).backend == "a" and trees.match((9,)).backend is None


def test_fast_enough_for_the_simulator() -> None:
    """12,031 requests of ~23 blocks over 8 backends: conversations that grow turn by turn."""
    rng = random.Random(0)
    core = make(tuple(f"b{i}" for i in range(8)), eviction_interval_s=60)
    sessions: list[list[int]] = []
    next_block = 1
    started = time.perf_counter()
    for i in range(12_031):
        if not sessions or rng.random() < 0.3:
            sessions.append([])
        chain = sessions[rng.randrange(len(sessions))]
        grow = rng.randint(1, 5) if chain else rng.randint(15, 25)
        chain.extend(range(next_block, next_block + grow))
        next_block += grow
        blocks = tuple(chain[-23:]) if len(chain) > 40 else tuple(chain)
        core.route(rq(f"r{i}", blocks), float(i) * 0.1)
        if i >= 64:
            finish(core, f"r{i - 64}", float(i) * 0.1)
    elapsed = time.perf_counter() - started
    decisions = policy_of(core).decisions
    assert decisions["cache_hit"] > 5_000
    assert elapsed < 8.0, f"{elapsed:.2f} s for 12,031 routings"
