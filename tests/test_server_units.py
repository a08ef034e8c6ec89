"""The server's small parts on their own: config sources, the breaker, metrics text."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.server.config import load_config
from router.server.metrics import RouterMetrics
from router.server.pool import BreakerState, CircuitBreaker


def test_config_cli_over_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("port: 7000\nmax_attempts: 5\napi_keys: [a, b]\npolicy: random\n")
    monkeypatch.setenv("PREFIX_ROUTER_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("PREFIX_ROUTER_BACKENDS", "gpu1:30000, http://gpu2:30000/")
    cfg = load_config(path, port=None, policy="round_robin")
    assert cfg.port == 7000  # YAML (CLI gave nothing)
    assert cfg.max_attempts == 4  # env beats YAML
    assert cfg.policy == "round_robin"  # CLI beats YAML
    assert cfg.api_keys == ["a", "b"]
    assert cfg.backends == ["http://gpu1:30000", "http://gpu2:30000"]
    with pytest.raises(ValueError):
        load_config(None, port=-1)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def _state(b: CircuitBreaker) -> BreakerState:
    """Read afresh (mypy would keep `b.state` narrowed across the calls that change it)."""
    return b.state


def test_breaker_opens_after_failures_and_half_opens_after_cooldown() -> None:
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    assert not b.record_failure(0.0) and not b.record_failure(1.0)
    assert b.record_failure(2.0) and _state(b) is BreakerState.OPEN
    assert not b.may_probe(5.0)  # cooling down
    assert b.may_probe(12.0) and _state(b) is BreakerState.HALF_OPEN
    assert b.record_failure(12.5)  # a failed probe re-opens at once
    assert not b.may_probe(20.0)
    assert b.may_probe(23.0)
    b.record_success()
    assert b.closed and b.failures == 0
    assert b.record_failure(30.0, trip=True)  # a refused connection opens at once


def test_metrics_text_format() -> None:
    m = RouterMetrics()
    m.requests.inc("/v1/chat/completions", "200")
    m.ttft.observe("http://a", value=0.03)
    m.ttft.observe("http://a", value=100.0)
    m.prompt_tokens.inc("http://a", amount=200)
    m.reported_cached.inc("http://a", amount=50)
    m.predicted_cached.inc("http://a", amount=100)
    text = m.render()
    assert "# TYPE prefix_router_ttft_seconds histogram" in text
    assert 'prefix_router_ttft_seconds_bucket{backend="http://a",le="0.05"} 1' in text
    assert 'prefix_router_ttft_seconds_bucket{backend="http://a",le="+Inf"} 2' in text
    assert 'prefix_router_ttft_seconds_count{backend="http://a"} 2' in text
    assert "prefix_router_hit_ratio 0.25" in text
    assert "prefix_router_predicted_hit_ratio 0.5" in text
    assert text.endswith("\n")
