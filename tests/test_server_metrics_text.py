"""router.server.metrics keeps plain numbers and renders through prometheus_client at a scrape:
its text must be the library's own metric classes' text, sample for sample.

The same updates go to our Counter / Gauge / Histogram and to prometheus_client's, each in its
own registry; both registries are rendered with `generate_latest` and compared whole.
Histograms cover positive buckets (with `_sum`) and signed ones (the library then writes a
`_count` and no `_sum`), labelled and unlabelled, before and after the first update.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from router.server.metrics import (
    CACHED_ERROR_BUCKETS,
    DISPATCH_BUCKETS,
    REGRET_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    Registry,
    RouterMetrics,
)

B1, B2 = "http://127.0.0.1:1234", "http://10.0.0.2:30000"


def _pair() -> tuple[Registry, CollectorRegistry, dict[str, tuple[Any, Any]]]:
    ours = Registry()
    theirs = CollectorRegistry(auto_describe=True)
    specs: dict[str, tuple[Any, Any, tuple[str, ...], tuple[float, ...] | None]] = {
        "req": (Counter, prometheus_client.Counter, ("endpoint", "status"), None),
        "retries": (Counter, prometheus_client.Counter, (), None),
        "inflight": (Gauge, prometheus_client.Gauge, (), None),
        "healthy": (Gauge, prometheus_client.Gauge, ("backend",), None),
        "dispatch": (Histogram, prometheus_client.Histogram, (), DISPATCH_BUCKETS),
        "regret": (Histogram, prometheus_client.Histogram, ("backend",), REGRET_BUCKETS),
        "cached": (Histogram, prometheus_client.Histogram, ("backend",), CACHED_ERROR_BUCKETS),
    }
    made: dict[str, tuple[Any, Any]] = {}
    for key, (mine, lib, labels, buckets) in specs.items():
        name = f"t_{key}_total" if mine is Counter else f"t_{key}"
        extra = {} if buckets is None else {"buckets": buckets}
        a = ours.register(mine(name, f"help {key}", labels, **extra))
        b = lib(name, f"help {key}", labels, registry=None, **extra)
        theirs.register(b)
        made[key] = (a, b)
    return ours, theirs, made


def _render(ours: Registry, theirs: CollectorRegistry) -> tuple[str, str]:
    return ours.render(), generate_latest(theirs).decode()


def test_text_matches_the_library() -> None:
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    ours, theirs, m = _pair()
    before = _render(ours, theirs)
    assert before[0] == before[1]  # nothing observed yet: unlabelled series at 0
    updates = [
        ("req", ("/v1/chat/completions", "200"), "inc", 1.0),
        ("req", ("/v1/chat/completions", "200"), "inc", 1.0),
        ("req", ("/generate", "503"), "inc", 1.0),
        ("retries", (), "inc", 1.0),
        ("inflight", (), "inc", 3.0),
        ("inflight", (), "inc", -1.0),
        ("healthy", (B1,), "set", 1.0),
        ("healthy", (B2,), "set", 0.0),
        ("dispatch", (), "observe", 0.0005),  # on a bound: counted in it
        ("dispatch", (), "observe", 0.0007),
        ("dispatch", (), "observe", 99.0),  # past the last bound: +Inf only
        ("regret", (B1,), "observe", -0.3),
        ("regret", (B2,), "observe", 0.0),
        ("regret", (B1,), "observe", 12.5),
        ("cached", (B1,), "observe", -64.0),
        ("cached", (B1,), "observe", 63.5),
    ]
    for key, labels, op, value in updates:
        mine, lib = m[key]
        child = lib.labels(*labels) if labels else lib
        if op == "inc":
            mine.inc(*labels, amount=value)
            child.inc(value)
        elif op == "set":
            mine.set(*labels, value=value)
            child.set(value)
        else:
            mine.observe(*labels, value=value)
            child.observe(value)
    text, expected = _render(ours, theirs)
    assert text == expected
    assert 't_regret_count{backend="http://127.0.0.1:1234"} 2.0' in text
    assert "t_regret_sum" not in text and "t_dispatch_sum 99.0012" in text


def test_reads_and_misuse() -> None:
    m = RouterMetrics()
    m.routed.inc(B1)
    m.routed.inc(B1, amount=2)
    m.ttft.observe(B1, value=0.2)
    m.prompt_tokens.inc(B1, amount=10)
    m.prompt_tokens.inc(B2, amount=5)
    assert m.routed.get(B1) == 3.0 and m.routed.get(B2) == 0.0
    assert m.ttft.count(B1) == 1 and m.ttft.count(B2) == 0
    assert m.prompt_tokens.total() == 15.0
    with pytest.raises(ValueError, match="takes labels"):
        m.routed.inc()
    with pytest.raises(ValueError, match="non-negative"):
        m.routed.inc(B1, amount=-1)
    m.backend_healthy.set(B1, value=1)
    m.backend_healthy.clear()
    assert "prefix_router_backend_healthy{" not in m.render()
