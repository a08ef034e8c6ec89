"""Several routing views (the workers of `serve --workers N`) in virtual time, and what the
cost policy makes of another view's requests.

Real cores, the real cost policy and the real simulated engines; the trace is a generated
multi-turn window (a few hundred requests, well under a second per run).
"""

from __future__ import annotations

import math

from state_fixtures import make_core, prompt

from router.core.model import RouteRequest
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.views import ViewSync


def test_a_view_hears_the_others_prefix_after_the_delay() -> None:
    one, two = make_core(), make_core()
    views = ViewSync([one, two], delay_s=0.01)
    req = prompt("r1", seed=7)
    decision = one.route(req, 0.0)
    views.routed(0, decision.backend, req, 0.0)
    views.apply_until(0.005)
    assert two.policy.index.match(req.blocks) == {}  # type: ignore[attr-defined]
    views.apply_until(0.01)
    held = two.policy.index.match(req.blocks)  # type: ignore[attr-defined]
    assert held == {decision.backend: len(req.blocks)}
    # the same conversation's next turn, routed by the other view, follows the prefix
    follow = prompt("r2", seed=7, extra=(12345,))
    assert two.route(follow, 0.02).backend == decision.backend


def test_remote_decoding_requests_make_a_backend_dearer() -> None:
    core = make_core()
    policy = core.policy
    short = RouteRequest(rid="x", blocks=(1,), block_tokens=64, prompt_tokens=64, max_tokens=512)
    assert core.route(short, 0.0).backend == "a"  # idle pool: ties go to "a"
    core.on_failed("x", 0.0)
    for k in range(64):  # another worker's long requests, all decoding on "a"
        remote = prompt(f"w1/{k}", seed=100 + k)
        policy.on_remote_routed("a", remote, 0.0)
        policy.on_remote_first_token("a", remote.rid, 0.1)
    again = RouteRequest(rid="y", blocks=(1,), block_tokens=64, prompt_tokens=64, max_tokens=512)
    assert core.route(again, 0.2).backend == "b"
    core.on_failed("y", 0.2)
    for k in range(64):
        policy.on_remote_ended("a", f"w1/{k}", 0.3)
    last = RouteRequest(rid="z", blocks=(2,), block_tokens=64, prompt_tokens=64, max_tokens=512)
    assert core.route(last, 0.4).backend == "a"  # their batch ended: "a" is cheap again


def test_two_sharing_views_route_about_as_one_and_better_than_two_strangers() -> None:
    window = multi_turn(MultiTurnConfig(seed=1)).window(240.0, 60.0)
    pool = ("llama3-8b-h100",) * 4

    def run(views: int, delay: float) -> dict[str, float]:
        config = SimConfig(profiles=pool, load=5.104, views=views, sync_delay_s=delay)
        return simulate_policy(window, "cost", config).summary

    one, sharing, strangers = run(1, 0.0), run(2, 0.003), run(2, math.inf)
    assert sharing["failed"] == 0 and sharing["requests"] == one["requests"]
    assert abs(sharing["hit_ratio"] - one["hit_ratio"]) <= 0.02
    assert sharing["hit_ratio"] >= strangers["hit_ratio"] + 0.03
    assert sharing["ttft_mean"] < strangers["ttft_mean"]
