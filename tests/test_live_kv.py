"""LiveKV (router/core/live_kv.py) and the budget's queue it gates (CostPolicy.budget_queue_s)."""

from __future__ import annotations

import pytest

from router.core.live_kv import LiveKV
from router.core.model import BackendSpec, PerfPrior, RouteRequest
from router.core.policies import make_policy
from router.core.routing import RoutingCore


def test_a_shared_prefix_is_held_once_and_released_with_its_last_request() -> None:
    kv = LiveKV()
    kv.add("b0", (1, 2, 3), 100)
    kv.add("b0", (1, 2, 4), 100)  # shares blocks 1 and 2
    assert kv.tokens("b0", 0) == 400
    # The first decodes: the core's context sum counts its prompt (300) and 20 output tokens.
    kv.first_token("r1", "b0", 300)
    assert kv.tokens("b0", 320) == 420
    kv.remove("r1", "b0", (1, 2, 3))  # blocks 1 and 2 still held by the other request
    assert kv.tokens("b0", 0) == 300
    kv.remove("r2", "b0", (1, 2, 4))
    assert kv.tokens("b0", 0) == 0
    assert kv.tokens("b9", 123) == 123  # a backend it never saw: the core's own figure
    kv.add("b1", (7,), 10)
    kv.forget_backend("b1")
    assert kv.tokens("b1", 0) == 0


PRIOR = PerfPrior(
    prefill_tokens_per_s=10_000.0,
    prefill_s_per_token_ctx=0.0,
    decode_step_s=0.01,
    decode_s_per_kv_token=1e-6,
)


def _req(rid: str, tokens: int, first: int) -> RouteRequest:
    blocks = tuple(range(first, first + tokens // 100))
    return RouteRequest(rid=rid, blocks=blocks, block_tokens=100, prompt_tokens=tokens)


def test_the_budget_counts_the_decode_share_once_per_step_while_kv_has_room() -> None:
    spec = BackendSpec(id="b0", kv_capacity_tokens=1_000_000, prior=PRIOR)
    core = RoutingCore(make_policy("cost", calibrate=False, interference=0.0), [spec])
    policy = core.policy
    policy.track_live_kv()  # type: ignore[attr-defined]
    core.route(_req("stream", 10_000, 0), 0.0)
    core.on_first_token("stream", 1.0, cached_tokens=0)  # decoding: 10,001 KV tokens
    for i in range(3):  # three 500-token prompts, each 0.05 s of prefill
        core.route(_req(f"r{i}", 500, 1000 + 10 * i), 1.0)
    (state,) = core.backends()
    # Each was priced with the decode step its prefill shares, 0.01 + 1e-6 * 10,001 s, and
    # added it to the backlog; the three fit one engine step (1,500 <= 16,384 tokens).
    mixed = 0.01 + 1e-6 * 10_001
    queue = policy.queue_s(state, 1.0)  # type: ignore[attr-defined]
    assert queue == pytest.approx(3 * (0.05 + mixed))
    budget_queue = policy.budget_queue_s(state, 1.0, 16_384, 0.85)  # type: ignore[attr-defined]
    assert budget_queue == pytest.approx(3 * 0.05 + mixed)
    # In-flight requests holding more than the share of its KV: counted per request again.
    tight = policy.budget_queue_s(state, 1.0, 16_384, 0.01)  # type: ignore[attr-defined]
    assert tight == pytest.approx(queue)
    # Steps of 500 tokens: each prefill in a step of its own, so no sharing to take back.
    assert policy.budget_queue_s(state, 1.0, 500, 0.85) == pytest.approx(queue)  # type: ignore[attr-defined]
