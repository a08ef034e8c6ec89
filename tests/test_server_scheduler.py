"""`serve --scheduler on` through real HTTP: a real router in front of real simulated backends."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import openai
import pytest
from server_fixtures import router_for, serving

from backends.sim.api import SimRequest
from backends.sim.engine import Engine, EngineConfig
from backends.sim.perf import get_profile
from backends.sim.server import EngineFigures, EngineLike, build_engine, start_sim_servers

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LONG = " ".join(f"Clause {i}: the tenant shall keep the premises tidy." for i in range(200))


async def _chat(client: openai.AsyncOpenAI, text: str, **extra: object) -> str:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=4,
        stream=True,
        **extra,  # type: ignore[arg-type]
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def test_every_request_is_bound_and_answered_with_the_scheduler_on() -> None:
    # A budget far under one prompt's prefill: each backend takes one request at a time and
    # the rest wait in the router, released as first tokens come back.
    async with serving(2, policy="cost", scheduler=True, scheduler_budget_s=0.001) as setup:
        client = openai.AsyncOpenAI(base_url=setup.url + "/v1", api_key="k", max_retries=0)
        texts = await asyncio.gather(
            *(
                _chat(client, f"{LONG} question {i}", extra_headers={"X-Tenant": f"t{i % 2}"})
                for i in range(10)
            )
        )
        assert all(texts)
        async with setup.session.get(setup.url + "/stats") as resp:
            stats = (await resp.json())["scheduler"]
        assert stats["bound"] == 10 and stats["waiting"] == 0 and stats["shed"] == 0
        assert set(stats["served_s_by_tenant"]) == {"t0", "t1"}
        async with setup.session.get(setup.url + "/metrics") as resp:
            text = await resp.text()
        assert "prefix_router_scheduler_bound_total 10" in text
        assert "prefix_router_scheduler_wait_seconds_count 10" in text
        assert "prefix_router_scheduler_waiting 0" in text


async def test_a_request_that_cannot_meet_its_deadline_gets_429_before_any_backend_work() -> None:
    async with serving(2, policy="cost", scheduler=True, slo_ttft_s=30.0) as setup:
        url = setup.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 4}
        # Its own deadline (1 ms) is under the prompt's predicted prefill on an idle backend.
        async with setup.session.post(url, json=body, headers={"X-TTFT-SLO": "0.001"}) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
            error = (await resp.json())["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "router_slo"
        assert "deadline" in error["message"]
        # The SDK sees a RateLimitError, as from any OpenAI-compatible server.
        client = openai.AsyncOpenAI(base_url=setup.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            await _chat(client, LONG, extra_headers={"X-TTFT-SLO": "0.001"})
        # The deployment's 30 s deadline admits the same request.
        assert await _chat(client, LONG)
        async with setup.session.get(setup.url + "/stats") as resp:
            stats = await resp.json()
        assert stats["scheduler"]["shed_by_reason"] == {"slo": 2}
        assert sum(b["routed"] for b in stats["backends"]) == 1  # the shed ones never went out
        async with setup.session.get(setup.url + "/metrics") as resp:
            assert 'prefix_router_scheduler_shed_total{reason="slo"} 2' in await resp.text()


async def test_bad_priority_or_deadline_headers_are_a_400() -> None:
    async with serving(1, policy="cost", scheduler=True) as setup:
        url = setup.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({"X-Priority": "high"}, {"X-TTFT-SLO": "-1"}, {"X-TTFT-SLO": "soon"}):
            async with setup.session.post(url, json=body, headers=headers) as resp:
                assert resp.status == 400, headers
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with setup.session.post(url, json={**body, "priority": "x"}) as resp:
            assert resp.status == 400
        async with setup.session.post(url, json={**body, "priority": 3}) as resp:
            assert resp.status == 200


async def test_the_api_key_is_the_tenant_when_no_header_names_one() -> None:
    async with serving(1, policy="cost", scheduler=True, api_keys=["secret-key-a"]) as setup:
        client = openai.AsyncOpenAI(
            base_url=setup.url + "/v1", api_key="secret-key-a", max_retries=0
        )
        assert await _chat(client, "hello")
        async with setup.session.get(setup.url + "/stats") as resp:
            tenants = (await resp.json())["scheduler"]["served_s_by_tenant"]
        (tenant,) = tenants
        assert tenant.startswith("key:") and "secret" not in tenant


class _SeenPriorities(Engine):
    """A real simulated engine run with priority scheduling that notes each request's priority
    as it arrives: what the router sent in SGLang's `priority` field."""

    seen: ClassVar[list[int | None]] = []

    def add_request(self, req: SimRequest, now: float) -> None:
        self.seen.append(req.priority)
        super().add_request(req, now)


def _priority_engine() -> tuple[EngineLike, EngineFigures]:
    config = {"page_size": 16, "enable_priority_scheduling": True}
    _, figures = build_engine("llama3-8b-h100", **config)
    return _SeenPriorities(get_profile("llama3-8b-h100"), EngineConfig(**config)), figures


async def test_engine_priority_reaches_the_backend_as_sglangs_priority_field() -> None:
    _SeenPriorities.seen = []
    handles = await start_sim_servers(1, speedup=20.0, engine_factory=_priority_engine)
    try:
        async with router_for(
            [h.url for h in handles], policy="cost", scheduler=True, scheduler_engine_priority=True
        ) as router:
            client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
            # The flood's request: alone, at its share (priority 0). The other tenant then has
            # had none of the recent prefill: under its share, so 1 (ahead of the flood's).
            assert await _chat(client, LONG, extra_headers={"X-Tenant": "flood"})
            assert await _chat(client, "hello", extra_headers={"X-Tenant": "small"})
            # A client's own `priority` (9) keeps its rank: 2 x 9, the under-share bit below it.
            flood = {"X-Tenant": "flood"}
            assert await _chat(client, "again", extra_headers=flood, extra_body={"priority": 9})
    finally:
        for h in handles:
            await h.close()
    assert _SeenPriorities.seen == [0, 1, 18]


async def test_isolation_is_on_by_default_and_the_flag_turns_it_off() -> None:
    from router.cli import build_parser
    from router.server.config import load_config
    from router.server.scheduling import scheduler_config

    args = build_parser().parse_args(["serve", "--scheduler-isolation", "off"])
    assert args.scheduler_isolation == "off"
    assert scheduler_config(load_config(scheduler_isolation=False)).isolation is False
    for overrides, expected in (({}, True), ({"scheduler_isolation": False}, False)):
        async with serving(1, policy="cost", scheduler=True, **overrides) as setup:
            client = openai.AsyncOpenAI(base_url=setup.url + "/v1", api_key="k", max_retries=0)
            for tenant in ("flood", "small"):
                assert await _chat(client, LONG, extra_headers={"X-Tenant": tenant})
            async with setup.session.get(setup.url + "/stats") as resp:
                stats = (await resp.json())["scheduler"]
            assert stats["config"]["isolation"] is expected
            assert stats["bound"] == 2 and set(stats["served_s_by_tenant"]) == {"flood", "small"}


async def test_scheduler_headroom_sets_or_turns_off_throughput_admission() -> None:
    from router.cli import build_parser
    from router.server.config import load_config
    from router.server.scheduling import scheduler_config

    parse = build_parser().parse_args
    assert parse(["serve", "--scheduler-headroom", "off"]).scheduler_headroom == 0.0
    assert parse(["serve", "--scheduler-headroom", "2.5"]).scheduler_headroom == 2.5
    for bad in ("-1", "nan", "lots"):
        with pytest.raises(SystemExit):
            parse(["serve", "--scheduler-headroom", bad])
    default = scheduler_config(load_config())
    assert default.throughput_admission and default.throughput_headroom == 1.5
    assert scheduler_config(load_config(scheduler_headroom=2.5)).throughput_headroom == 2.5
    assert scheduler_config(load_config(scheduler_headroom=0)).throughput_admission is False
    async with serving(1, policy="cost", scheduler=True, scheduler_headroom=0) as setup:
        async with setup.session.get(setup.url + "/stats") as resp:
            config = (await resp.json())["scheduler"]["config"]
        assert config["throughput_admission"] is False
