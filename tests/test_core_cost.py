"""Online calibration of PP/TG, expected output length, and the cost formula by hand."""

from __future__ import annotations

import math
import random

import pytest

from router.core.cost import OutputLengthModel, PerfModel
from router.core.model import PerfPrior

PRIOR = PerfPrior(
    prefill_tokens_per_s=10_000.0,
    prefill_s_per_token_ctx=1e-9,
    decode_step_s=0.020,
    decode_s_per_kv_token=1e-7,
)


def scaled(prior: PerfPrior, slower: float) -> PerfPrior:
    return PerfPrior(
        prefill_tokens_per_s=prior.prefill_tokens_per_s / slower,
        prefill_s_per_token_ctx=prior.prefill_s_per_token_ctx * slower,
        decode_step_s=prior.decode_step_s * slower,
        decode_s_per_kv_token=prior.decode_s_per_kv_token * slower,
    )


def feed(model: PerfModel, truth: PerfPrior, rng: random.Random, n: int = 200) -> None:
    """n requests: noisy prefill and decode observations, a few wild outliers among them."""
    for _ in range(n):
        new = rng.randrange(100, 8000)
        ctx = new + rng.randrange(0, 8000)
        kv = rng.randrange(1000, 200_000)
        pre = truth.prefill_time(new, ctx) * math.exp(rng.gauss(0, 0.15))
        dec = truth.decode_step_time(kv) * math.exp(rng.gauss(0, 0.10))
        if rng.random() < 0.04:  # a TTFT that hid a queue, a stalled stream
            pre *= rng.uniform(3, 20)
        if rng.random() < 0.04:
            dec *= rng.uniform(3, 10)
        model.observe_prefill(new, ctx, pre)
        model.observe_decode(kv, dec)


def assert_learned(model: PerfModel, truth: PerfPrior) -> None:
    got = model.learned()
    assert got.prefill_tokens_per_s == pytest.approx(truth.prefill_tokens_per_s, rel=0.10)
    assert got.decode_step_s == pytest.approx(truth.decode_step_s, rel=0.10)
    for kv in (10_000, 100_000):
        assert model.decode_step_time(kv) == pytest.approx(truth.decode_step_time(kv), rel=0.10)
    for new, ctx in ((500, 500), (4000, 8000)):
        assert model.prefill_time(new, ctx) == pytest.approx(truth.prefill_time(new, ctx), rel=0.10)


def test_prior_is_used_before_any_observation() -> None:
    m = PerfModel(PRIOR)
    assert m.prefill_time(1000, 1000) == pytest.approx(PRIOR.prefill_time(1000, 1000))
    assert m.decode_step_time(5000) == pytest.approx(PRIOR.decode_step_time(5000))
    assert m.prefill_time(0, 1000) == 0.0
    assert m.learned() == PRIOR


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_learns_a_backend_twice_as_slow_as_its_prior(seed: int) -> None:
    truth = scaled(PRIOR, 2.0)
    model = PerfModel(PRIOR)
    feed(model, truth, random.Random(seed))
    assert model.prefill_observations == 200 and model.decode_observations == 200
    assert_learned(model, truth)


def test_learns_a_mixed_pool_of_two_true_speeds() -> None:
    """Four backends share one prior; two are 2.5x slower than it, two 1.5x faster."""
    rng = random.Random(7)
    truths = [
        scaled(PRIOR, 2.5),
        scaled(PRIOR, 2.5),
        scaled(PRIOR, 1 / 1.5),
        scaled(PRIOR, 1 / 1.5),
    ]
    models = [PerfModel(PRIOR) for _ in truths]
    for _ in range(200):  # interleaved, as a router's requests are
        for model, truth in zip(models, truths, strict=True):
            feed(model, truth, rng, n=1)
    for model, truth in zip(models, truths, strict=True):
        assert_learned(model, truth)


def test_a_different_shape_than_the_prior_is_learned() -> None:
    """True decode has twice the fixed cost but a quarter of the per-KV cost of the prior."""
    truth = PerfPrior(
        prefill_tokens_per_s=12_000.0,
        prefill_s_per_token_ctx=0.0,
        decode_step_s=0.040,
        decode_s_per_kv_token=2.5e-8,
    )
    model = PerfModel(PRIOR)
    feed(model, truth, random.Random(11), n=300)
    assert_learned(model, truth)
    # the per-KV term is a small part of each step here (<= 12%), so it is only roughly pinned,
    # but it has moved most of the way from the prior (1e-7) toward the truth
    assert model.learned().decode_s_per_kv_token < 6e-8


def test_garbage_observations_are_ignored() -> None:
    model = PerfModel(PRIOR)
    model.observe_prefill(1000, 1000, -1.0)
    model.observe_prefill(1000, 1000, float("nan"))
    model.observe_decode(1000, 0.0)
    model.observe_prefill(0, 1000, 1.0)
    assert model.prefill_observations == 0 and model.decode_observations == 0
    assert model.learned() == PRIOR
    with pytest.raises(ValueError):
        PerfModel(PRIOR, window=2)


def test_unexcited_direction_stays_near_the_prior() -> None:
    """Every prompt the same size: only the total is learned, the split stays sane."""
    model = PerfModel(PRIOR)
    truth = scaled(PRIOR, 2.0)
    for _ in range(100):
        model.observe_prefill(2000, 2000, truth.prefill_time(2000, 2000))
    assert model.prefill_time(2000, 2000) == pytest.approx(truth.prefill_time(2000, 2000), rel=0.02)
    learned = model.learned()
    assert learned.prefill_tokens_per_s > 0 and learned.prefill_s_per_token_ctx >= 0


def test_output_length_model() -> None:
    m = OutputLengthModel(default=200)
    assert m.expect(None) == 200 and m.expect(50) == 50
    for n in (100, 100, 300, 500):
        m.observe(n)
    assert m.expect(None) == pytest.approx(250)  # mean
    # E[min(N, 200)] = (100 + 100 + 200 + 200) / 4
    assert m.expect(200) == pytest.approx(150)
    assert m.expect(1000) == pytest.approx(250)
    assert m.expect(0) == 0
    assert m.observations == 4
    with pytest.raises(ValueError):
        m.observe(-1)


def test_output_length_model_window_tracks_recent_traffic() -> None:
    m = OutputLengthModel(window=64, refresh_every=8)
    for _ in range(64):
        m.observe(1000)
    for _ in range(64):
        m.observe(10)
    assert m.expect(None) == pytest.approx(10)
