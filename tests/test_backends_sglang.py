"""backends.sglang: discovery, load, health and abort against real servers; response parsers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port

from backends.sglang import (
    BackendError,
    BackendLoad,
    TokenUsage,
    abort_request,
    cached_tokens_from_meta,
    cached_tokens_from_openai,
    check_health,
    fetch_load,
    fetch_server_info,
    parse_load,
    usage_from_sse_chunk,
)


async def _serve(routes: dict[str, Any]) -> tuple[web.AppRunner, str]:
    """A tiny aiohttp server answering GET path -> JSON (older/newer SGLang shapes)."""
    app = web.Application()
    for path, body in routes.items():

        async def handler(request: web.Request, body: Any = body) -> web.Response:
            return web.json_response(body)

        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_fetch_server_info_from_sim(sim_server: Any) -> None:
    async with aiohttp.ClientSession() as s:
        info = await fetch_server_info(s, sim_server.url)
    figures = sim_server.server.figures
    assert info.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert info.max_total_num_tokens == figures.max_total_num_tokens
    assert info.page_size == 16
    assert info.chunked_prefill_size == figures.chunked_prefill_size
    assert info.max_running_requests == figures.max_running_requests
    assert info.context_length == sim_server.server.context_length


async def test_fetch_server_info_falls_back_to_server_info_and_models() -> None:
    runner, url = await _serve(
        {
            "/server_info": {"model_path": "/models/llama", "max_total_num_tokens": 5000,
                             "page_size": 32, "chunked_prefill_size": 4096},
            "/v1/models": {"object": "list", "data": [{"id": "llama-served"}]},
        }
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as s:
            info = await fetch_server_info(s, url)
    finally:
        await runner.cleanup()
    assert info.model == "llama-served" and info.model_path == "/models/llama"
    assert (info.max_total_num_tokens, info.page_size, info.chunked_prefill_size) == (
        5000,
        32,
        4096,
    )
    assert info.max_running_requests is None


async def test_fetch_server_info_uses_model_info_last() -> None:
    runner, url = await _serve(
        {"/get_server_info": {"page_size": 1}, "/get_model_info": {"model_path": "qwen/q"}}
    )
    try:
        async with aiohttp.ClientSession() as s:
            info = await fetch_server_info(s, url)
    finally:
        await runner.cleanup()
    assert info.model == "qwen/q" and info.max_total_num_tokens is None


async def test_fetch_server_info_unreachable_is_backend_error() -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(BackendError):
            await fetch_server_info(s, f"http://127.0.0.1:{free_port()}", timeout=1.0)


async def test_fetch_load_idle_busy_and_get_load_fallback(sim_server: Any) -> None:
    async with aiohttp.ClientSession() as s:
        idle = await fetch_load(s, sim_server.url)
        assert idle.running == 0 and idle.waiting == 0
        assert idle.max_total_num_tokens == sim_server.server.figures.max_total_num_tokens
        task = asyncio.ensure_future(
            s.post(sim_server.url + "/generate",
                   json={"text": "x", "sampling_params": {"max_new_tokens": 300}})
        )  # fmt: skip
        await asyncio.sleep(0.1)
        busy = await fetch_load(s, sim_server.url)
        assert busy.running + busy.waiting == 1 and (busy.used_tokens or 0) > 0
        (await task).close()
    runner, url = await _serve(
        {"/get_load": [{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 77}]}
    )
    try:
        async with aiohttp.ClientSession() as s:
            old = await fetch_load(s, url)
    finally:
        await runner.cleanup()
    assert old == BackendLoad(running=3, waiting=2, used_tokens=77)


async def test_check_health_and_abort(sim_server: Any) -> None:
    async with aiohttp.ClientSession() as s:
        assert await check_health(s, sim_server.url, 1.0)
        assert await check_health(s, sim_server.url, 2.0, path="/health_generate")
        assert not await check_health(s, f"http://127.0.0.1:{free_port()}", 0.5)
        task = asyncio.ensure_future(
            s.post(sim_server.url + "/generate",
                   json={"text": "x", "rid": "r-1", "sampling_params": {"max_new_tokens": 9000}})
        )  # fmt: skip
        await asyncio.sleep(0.1)
        assert await abort_request(s, sim_server.url, "r-1")
        resp = await asyncio.wait_for(task, 2.0)
        body = await resp.json()
        assert body["meta_info"]["finish_reason"]["type"] == "abort"
        deadline = asyncio.get_running_loop().time() + 1.0  # freed at the step's end
        while (load := await fetch_load(s, sim_server.url)).running + load.waiting:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)


def test_cached_tokens_parsers() -> None:
    body = {"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                      "prompt_tokens_details": {"cached_tokens": 8}}}  # fmt: skip
    assert cached_tokens_from_openai(body) == 8
    assert cached_tokens_from_openai({"usage": {"prompt_tokens": 3}}) is None
    assert cached_tokens_from_openai({"usage": None}) is None
    assert cached_tokens_from_openai("nope") is None
    meta = {"prompt_tokens": 10, "cached_tokens": 7, "finish_reason": None}
    assert cached_tokens_from_meta(meta) == 7
    assert cached_tokens_from_meta({"text": "", "meta_info": meta}) == 7
    assert cached_tokens_from_meta({"prompt_tokens": 1}) is None


def test_usage_from_sse_chunk_generate_openai_and_noise() -> None:
    gen = {"text": "a b", "meta_info": {"prompt_tokens": 12, "completion_tokens": 2,
                                        "cached_tokens": 8, "finish_reason": None}}  # fmt: skip
    line = "data: " + json.dumps(gen) + "\n\n"
    assert usage_from_sse_chunk(line) == TokenUsage(
        prompt_tokens=12, completion_tokens=2, cached_tokens=8, finished=False
    )
    gen["meta_info"]["finish_reason"] = {"type": "length", "length": 2}  # type: ignore[index]
    assert usage_from_sse_chunk(("data: " + json.dumps(gen)).encode()).finished  # type: ignore[union-attr]
    final = {"id": "c", "object": "chat.completion.chunk", "choices": [],
             "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
                       "prompt_tokens_details": {"cached_tokens": 16}}}  # fmt: skip
    assert usage_from_sse_chunk(final) == TokenUsage(
        prompt_tokens=30, completion_tokens=4, cached_tokens=16
    )
    stop = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": None}
    assert usage_from_sse_chunk(json.dumps(stop)) == TokenUsage(finished=True)
    delta = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    assert usage_from_sse_chunk(json.dumps(delta)) is None
    for noise in ("data: [DONE]", b"data: [DONE]\n\n", ": keep-alive", "data: {broken", ""):
        assert usage_from_sse_chunk(noise) is None


def test_parse_load_shapes() -> None:
    v1 = {"loads": [{"num_running_reqs": 2, "num_waiting_reqs": 1, "num_used_tokens": 100,
                     "max_total_num_tokens": 1000, "cache_hit_rate": 0.5},
                    {"num_running_reqs": 1, "num_waiting_reqs": 0, "num_used_tokens": 10,
                     "max_total_num_tokens": 1000, "cache_hit_rate": 0.25}]}  # fmt: skip
    load = parse_load(v1)
    assert load is not None
    assert (load.running, load.waiting, load.used_tokens, load.max_total_num_tokens) == (
        3,
        1,
        110,
        2000,
    )
    assert parse_load({"load": 4}) == BackendLoad(running=4, waiting=0)
    assert parse_load({"something": 1}) is None
    assert parse_load({"loads": ["x"]}) is None
