"""The router in front of real simulated SGLang servers: OpenAI SDK, caching, /generate, ops."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re

import openai
import pytest
from server_fixtures import cache_policy, router_for, serving, sims

LONG_SYSTEM = " ".join(f"Rule {i}: answer carefully and cite sources." for i in range(120))
SECRET = "zebra-quartz-secret-prompt-text"


def _sync_sdk(base: str) -> tuple[str, str, str]:
    """The sync OpenAI client, run in a thread (it blocks)."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
    one = client.chat.completions.create(
        model="meta-llama/Llama-3.1-8B-Instruct",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8,
    )
    parts = []
    for chunk in client.chat.completions.create(
        model="meta-llama/Llama-3.1-8B-Instruct",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8,
        stream=True,
    ):
        assert chunk.usage is None  # the router strips the usage chunk it asked for
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    comp = client.completions.create(
        model="meta-llama/Llama-3.1-8B-Instruct", prompt="Once upon", max_tokens=5
    )
    return one.choices[0].message.content or "", "".join(parts), comp.choices[0].text


async def test_openai_sdk_sync_and_async_stream_and_not() -> None:
    async with sims(2) as handles, router_for([h.url for h in handles]) as router:
        text, streamed, completion = await asyncio.to_thread(_sync_sdk, router.url)
        assert text and streamed and completion

        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["meta-llama/Llama-3.1-8B-Instruct"]
        resp = await client.chat.completions.create(
            model=models.data[0].id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
        )
        assert resp.choices[0].message.content
        assert resp.usage is not None and resp.usage.completion_tokens == 6
        stream = await client.chat.completions.create(
            model=models.data[0].id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        pieces = []
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage  # asked for: passed through
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert pieces and usage is not None and usage.completion_tokens == 6
        await client.close()
        # every request ended in the core: nothing left in flight
        assert all(b.load == 0 for b in router.state.core.backends())


async def test_same_long_prefix_hits_cache_on_same_backend() -> None:
    async with serving(3, policy=cache_policy()) as env:
        router, s = env.router, env.session
        seen = []
        for question in ("What is rule 3?", "What is rule 7?"):
            body = {
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "messages": [
                    {"role": "system", "content": LONG_SYSTEM},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 4,
            }
            async with s.post(router.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                data = await r.json()
                seen.append(
                    (
                        r.headers["X-Prefix-Router-Backend"],
                        data["usage"]["prompt_tokens_details"]["cached_tokens"],
                    )
                )
        assert seen[0][0] == seen[1][0]
        assert seen[1][1] > 1000
        stats = await (await s.get(router.url + "/stats")).json()
        row = next(b for b in stats["backends"] if b["url"] == seen[0][0])
        assert row["reported_cached_tokens"] == seen[1][1] + seen[0][1]
        metrics = await (await s.get(router.url + "/metrics")).text()
        assert "prefix_router_hit_ratio" in metrics
        assert f'prefix_router_routing_decisions_total{{backend="{seen[0][0]}"}} 2' in metrics


async def test_generate_streams_cumulative_text_ending_in_done() -> None:
    async with serving(1) as env:
        router, s = env.router, env.session
        body = {
            "text": "Hello there",
            "sampling_params": {"max_new_tokens": 300},
            "stream": True,
        }
        async with s.post(router.url + "/generate", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = []
            async for line in r.content:
                if line.startswith(b"data:"):
                    events.append(line[5:].strip())
        assert events[-1] == b"[DONE]"
        texts = [json.loads(e)["text"] for e in events[:-1]]
        assert len(texts) >= 2
        for a, b in itertools.pairwise(texts):
            assert b.startswith(a)  # cumulative, as SGLang streams it
        final = json.loads(events[-2])["meta_info"]
        assert final["completion_tokens"] == 300
        # input_ids, not streamed
        async with s.post(
            router.url + "/generate",
            json={"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 3}},
        ) as r:
            assert r.status == 200
            assert (await r.json())["meta_info"]["completion_tokens"] == 3


async def test_ops_endpoints_and_no_prompt_text_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(1) as env:
        router, s = env.router, env.session
        assert (await s.get(router.url + "/health")).status == 200
        ready = await s.get(router.url + "/readiness")
        assert ready.status == 200
        body = {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": SECRET}],
            "max_tokens": 3,
            "stream": True,
        }
        async with s.post(router.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            raw = await r.read()
        chunks = [
            json.loads(part[5:]) for part in raw.split(b"\n\n") if part.startswith(b"data: {")
        ]
        assert chunks and all(c.get("usage") is None for c in chunks)  # usage chunk stripped
        stats = await (await s.get(router.url + "/stats")).json()
        assert stats["backends"][0]["healthy"] is True
        assert stats["backends"][0]["routed"] == 1
        metrics = await (await s.get(router.url + "/metrics")).text()
        assert 'prefix_router_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in (
            metrics
        )
        assert "prefix_router_ttft_seconds_count" in metrics
        # arrival to upstream send, observed once per routed request (the TTFT's own share)
        assert re.search(r"^prefix_router_dispatch_seconds_count 1(\.0)?$", metrics, re.M)
    assert SECRET not in caplog.text
    assert any("rid=" in r.getMessage() and "cached=" in r.getMessage() for r in caplog.records)


async def test_log_prompts_flag_logs_prompt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serving(1, log_prompts=True) as env:
        router, s = env.router, env.session
        body = {"text": SECRET, "sampling_params": {"max_new_tokens": 2}}
        async with s.post(router.url + "/generate", json=body) as r:
            assert r.status == 200
    assert SECRET in caplog.text
