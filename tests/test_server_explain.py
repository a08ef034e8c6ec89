"""`serve --explain` and the regret metrics, against values computed by hand from the prior.

Two real simulated backends behind a real router (policy `cost`, profile llama3-8b-h100, whose
prior the router starts from). Token prompts (`/generate` input_ids) make n exact. Non-streamed
requests teach the cost model nothing (no first-token moment), so the prior's speeds stand and
each predicted TTFT is plain arithmetic:

    prefill(new, n) = new / PP + attention_pairs(new, n) * ctx    (attention_pairs: model.py)

Request 1 (n = 1000, idle pool): queue 0, decode share 0, nothing cached; both backends cost
the same, so it goes to the first and the second is the runner-up at the same TTFT.
Request 2 (its first 1000 tokens + 200): the first backend holds 15 whole blocks (960 tokens)
of it, so it prefills 240 new tokens; the runner-up prefills all 1200.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest

from router.core.model import Explanation, attention_pairs
from router.core.routing import Decision
from router.priors import prior_named
from router.server.explain import HEADER, parse_route_reason, route_reason
from router.server.metrics import CACHED_ERROR_BUCKETS, REGRET_BUCKETS
from tests.server_fixtures import serving

PROFILE = "llama3-8b-h100"


def _prefill(new: int, n: int) -> float:
    prior = prior_named(PROFILE)
    return (
        new / prior.prefill_tokens_per_s + attention_pairs(new, n) * prior.prefill_s_per_token_ctx
    )


def _cached(body: str) -> int:
    return int(json.loads(body)["meta_info"]["cached_tokens"])


def _last_cached(stream: str) -> int:
    events = [e[5:].strip() for e in stream.split("\n\n") if e.startswith("data:")]
    return _cached([e for e in events if e != "[DONE]"][-1])


def _buckets(text: str, name: str, backend: str) -> dict[float, int]:
    out: dict[float, int] = {}
    prefix = f'{name}_bucket{{backend="{backend}",le="'
    for line in text.splitlines():
        if line.startswith(prefix):
            le, _, value = line[len(prefix) :].partition('"} ')
            out[float(le)] = int(float(value))
    return out


def _metric(text: str, name: str, backend: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{backend="{backend}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {backend} not in /metrics")


async def _generate(session: Any, url: str, ids: list[int], stream: bool) -> tuple[str, Any]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 4}, "stream": stream}
    async with session.post(f"{url}/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
        return resp.headers[HEADER], text


async def test_route_reason_and_regret_match_the_prior_by_hand(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="router.server.proxy")
    async with serving(2, policy="cost", profile=PROFILE, explain=True) as s:
        first, second = (h.url for h in s.handles)
        one = list(range(1000))
        header, text1 = await _generate(s.session, s.url, one, stream=False)
        got = parse_route_reason(header)
        want1 = _prefill(1000, 1000)
        assert got["backend"] == first and got["runner_up"] == second
        assert float(got["queue"]) == 0.0 and float(got["decode"]) == 0.0
        assert got["cached"] == "0"
        assert float(got["prefill"]) == pytest.approx(want1, abs=1e-6)
        assert float(got["ttft"]) == pytest.approx(want1, abs=1e-6)
        assert float(got["runner_up_ttft"]) == pytest.approx(want1, abs=1e-6)

        header, text2 = await _generate(s.session, s.url, one + list(range(5000, 5200)), True)
        got = parse_route_reason(header)
        want2 = _prefill(240, 1200)
        assert got["backend"] == first and got["cached"] == "960"
        assert float(got["queue"]) == 0.0 and float(got["decode"]) == 0.0
        assert float(got["ttft"]) == pytest.approx(want2, abs=1e-6)
        assert got["runner_up"] == second
        assert float(got["runner_up_ttft"]) == pytest.approx(_prefill(1200, 1200), abs=1e-6)
        # the same explanation in the access log at DEBUG
        assert any(f"route {header}" in r.getMessage() for r in caplog.records)

        async with s.session.get(f"{s.url}/metrics") as resp:
            metrics = await resp.text()
        # regret = observed - predicted TTFT; only the streamed request has a first token
        name = "prefix_router_ttft_regret_seconds"
        assert _metric(metrics, f"{name}_count", first) == 1
        regret = _metric(metrics, "prefix_router_ttft_seconds_sum", first) - want2
        assert _metric(metrics, "prefix_router_predicted_ttft_seconds_total", first) == (
            pytest.approx(want2, abs=1e-9)
        )
        assert _buckets(metrics, name, first) == {
            le: int(regret <= le) for le in (*REGRET_BUCKETS, math.inf)
        }
        # cached tokens: reported - predicted, per request (0 then 960 predicted)
        reported = [_cached(text1), _last_cached(text2)]
        errors = [reported[0] - 0, reported[1] - 960]
        err = "prefix_router_cached_tokens_error"
        assert _buckets(metrics, err, first) == {
            le: sum(e <= le for e in errors) for le in (*CACHED_ERROR_BUCKETS, math.inf)
        }
        total = _metric(metrics, "prefix_router_cached_tokens_total", first)
        assert total - _metric(metrics, "prefix_router_predicted_cached_tokens_total", first) == (
            sum(errors)
        )


async def test_no_header_without_explain_and_plain_reason_for_other_policies() -> None:
    async with serving(2, policy="cost", profile=PROFILE) as s:
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
        async with s.session.post(f"{s.url}/generate", json=body) as resp:
            assert resp.status == 200 and HEADER not in resp.headers
    async with (
        serving(2, policy="round_robin", explain=True) as s,
        s.session.post(f"{s.url}/generate", json=body) as resp,
    ):
        got = parse_route_reason(resp.headers[HEADER])
        assert got["backend"] == resp.headers["X-Prefix-Router-Backend"]
        assert "ttft" not in got and "runner_up" not in got


def test_route_reason_format_and_lone_backend() -> None:
    ex = Explanation(queue_s=0.1, prefill_s=0.02, decode_s=0.003, cached_tokens=64)
    d = Decision(
        backend="http://a:1",
        predicted_cached_tokens=64,
        predicted_ttft_s=0.123,
        reason="",
        explain=ex,
    )
    assert route_reason(d) == (
        "backend=http://a:1; ttft=0.123000; queue=0.100000; prefill=0.020000; "
        "decode=0.003000; cached=64"
    )
    with pytest.raises(ValueError, match="come together"):
        Explanation(queue_s=0, prefill_s=0, decode_s=0, cached_tokens=0, runner_up="b")
    with pytest.raises(ValueError, match="not a key=value"):
        parse_route_reason("backend")
