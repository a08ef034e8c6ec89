"""The simulated SGLang server over real loopback HTTP: shapes, streaming, cache, aborts, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from typing import Any

import aiohttp
import openai
import pytest

from backends.sim.server import page_chain
from backends.sim.textgen import apply_chat_template, filler_ids, filler_text, get_tokenizer

LONG_PREFIX = "You are a meticulous assistant who answers questions about the sea. " * 60


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def _sse(session: aiohttp.ClientSession, url: str, body: Any) -> list[str]:
    """Every `data:` payload of a stream, in order."""
    out: list[str] = []
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                out.append(line[5:].strip())
    return out


async def _total_load(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/v1/loads") as resp:
        body = await resp.json()
    agg = body["aggregate"]
    return int(agg["total_running_reqs"] + agg["total_waiting_reqs"])


async def _wait_idle(session: aiohttp.ClientSession, url: str, within: float = 1.0) -> None:
    """The engine frees an aborted request at its current step's end: poll, bounded."""
    deadline = time.monotonic() + within
    while await _total_load(session, url) != 0:
        assert time.monotonic() < deadline, f"engine still busy after {within}s"
        await asyncio.sleep(0.02)


def test_filler_round_trips_through_the_tokenizer() -> None:
    tok = get_tokenizer()
    for offset in range(0, 30, 7):
        for count in (1, 2, 17, 100):
            ids = tok.encode(filler_text(count, offset))
            assert ids == filler_ids(count, offset)


def test_page_chain_takes_ids_past_64_bits_and_still_chains() -> None:
    big = [2**70 + i for i in range(40)]
    a = page_chain(big, 16)
    b = page_chain([*big[:32], 99], 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert a[0] != page_chain(list(range(40)), 16)[0]


def test_page_chain_is_a_prefix_chain() -> None:
    a = page_chain(list(range(40)), 16)
    b = page_chain([*range(32), 99, 98], 16)
    assert len(a) == 3 and len(b) == 3
    assert a[:2] == b[:2] and a[2] != b[2]
    assert page_chain([5, *range(1, 40)], 16)[0] != a[0]


async def test_generate_non_streaming(sim_server: Any) -> None:
    text = "The capital of France is"
    async with aiohttp.ClientSession() as s:
        status, body = await _post(
            s,
            sim_server.url + "/generate",
            {"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0}},
        )
    assert status == 200
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == len(get_tokenizer().encode(text))
    assert meta["completion_tokens"] == 12
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["cached_tokens"] == 0
    assert meta["e2e_latency"] > 0 and isinstance(meta["id"], str)
    assert len(get_tokenizer().encode(body["text"])) == 12
    assert body["output_ids"] == get_tokenizer().encode(body["text"])


async def test_generate_streaming_is_cumulative_and_ends_with_done(sim_server: Any) -> None:
    async with aiohttp.ClientSession() as s:
        events = await _sse(
            s,
            sim_server.url + "/generate",
            {"input_ids": list(range(1, 300)), "sampling_params": {"max_new_tokens": 40},
             "stream": True},
        )  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    prev_text, prev_n = "", 0
    for c in chunks:
        assert c["text"].startswith(prev_text)
        assert c["meta_info"]["completion_tokens"] >= prev_n
        assert c["meta_info"]["prompt_tokens"] == 299
        prev_text, prev_n = c["text"], c["meta_info"]["completion_tokens"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[-1]["meta_info"]["completion_tokens"] == 40
    assert len(get_tokenizer().encode(chunks[-1]["text"])) == 40


async def test_repeated_long_prefix_is_cached(sim_server: Any) -> None:
    url = sim_server.url + "/generate"
    async with aiohttp.ClientSession() as s:
        _, first = await _post(s, url, {"text": LONG_PREFIX + "Q1?", "sampling_params":
                                        {"max_new_tokens": 4}})  # fmt: skip
        _, second = await _post(s, url, {"text": LONG_PREFIX + "Q2, longer?", "sampling_params":
                                         {"max_new_tokens": 4}})  # fmt: skip
    assert first["meta_info"]["cached_tokens"] == 0
    cached = second["meta_info"]["cached_tokens"]
    prefix_tokens = len(get_tokenizer().encode(LONG_PREFIX))
    assert prefix_tokens - 32 <= cached <= second["meta_info"]["prompt_tokens"] - 1
    async with aiohttp.ClientSession() as s, s.post(sim_server.url + "/flush_cache") as r:
        assert r.status == 200
        _, third = await _post(s, url, {"text": LONG_PREFIX + "Q3?"})
    assert third["meta_info"]["cached_tokens"] == 0


async def test_openai_sdk_async_chat_and_completions(sim_server: Any) -> None:
    client = openai.AsyncOpenAI(base_url=sim_server.url + "/v1", api_key="none")
    messages = [{"role": "system", "content": LONG_PREFIX}, {"role": "user", "content": "Hi"}]
    chat = await client.chat.completions.create(model="m", messages=messages, max_tokens=7)  # type: ignore[arg-type]
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 7
    expected_prompt = len(get_tokenizer().encode(apply_chat_template(messages)))
    assert chat.usage.prompt_tokens == expected_prompt
    assert len(get_tokenizer().encode(chat.choices[0].message.content or "")) == 7
    again = await client.chat.completions.create(model="m", messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) > expected_prompt // 2

    stream = await client.chat.completions.create(
        model="m",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(get_tokenizer().encode("".join(parts))) == 30
    assert usage is not None and usage.completion_tokens == 30
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) > 0

    comp = await client.completions.create(model="m", prompt="Once upon a time", max_tokens=5)
    assert comp.choices[0].finish_reason == "length" and comp.usage is not None
    assert comp.usage.completion_tokens == 5
    cstream = await client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=9, stream=True
    )
    text = "".join([c.choices[0].text async for c in cstream if c.choices])
    assert len(get_tokenizer().encode(text)) == 9
    await client.close()


def test_openai_sdk_sync_against_subprocess(sim_process: Any) -> None:
    sp = sim_process(count=1)
    client = openai.OpenAI(base_url=sp.urls[0] + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=6
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(get_tokenizer().encode(text)) == 6
    comp = client.completions.create(model="m", prompt=[1, 2, 3, 4], max_tokens=2)
    assert comp.usage is not None and comp.usage.prompt_tokens == 4
    assert sp.stop() == 0
    assert sp.urls[0] in sp.log_text()


async def test_info_endpoints(sim_server: Any) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/get_server_info", "/server_info"):
            async with s.get(sim_server.url + path) as r:
                info = await r.json()
            assert info["page_size"] == 16
            assert info["max_total_num_tokens"] == sim_server.server.figures.max_total_num_tokens
            assert info["max_total_num_tokens"] > 10_000
            for key in ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests"):
                assert isinstance(info[key], int) and info[key] > 0
            assert info["model_path"] == "meta-llama/Llama-3.1-8B-Instruct"
        for path in ("/get_model_info", "/model_info"):
            async with s.get(sim_server.url + path) as r:
                mi = await r.json()
            assert mi["model_path"] == "meta-llama/Llama-3.1-8B-Instruct"
            assert mi["is_generation"] is True
        async with s.get(sim_server.url + "/v1/models") as r:
            models = await r.json()
        assert models["data"][0]["id"] == "meta-llama/Llama-3.1-8B-Instruct"
        for path in ("/health", "/health_generate"):
            async with s.get(sim_server.url + path) as r:
                assert r.status == 200


async def test_loads_while_busy_and_metrics(sim_server: Any) -> None:
    url = sim_server.url
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(
            _post(s, url + "/generate", {"text": "busy " * 50,
                                          "sampling_params": {"max_new_tokens": 400}})
        )  # fmt: skip
        await asyncio.sleep(0.1)
        async with s.get(url + "/v1/loads") as r:
            loads = await r.json()
        async with s.get(url + "/get_load") as r:
            get_load = await r.json()
        status, body = await task
        assert status == 200
        async with s.get(url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    entry = loads["loads"][0]
    assert entry["num_running_reqs"] + entry["num_waiting_reqs"] == 1
    assert entry["num_used_tokens"] > 0 and entry["max_total_num_tokens"] > 0
    assert loads["aggregate"]["total_reqs"] == 1
    assert get_load[0]["num_reqs"] == 1 and "num_waiting_reqs" in get_load[0]
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.fullmatch(r"(sglang:[a-z0-9_]+)(\{[^}]*\})? (\S+)", line)
            assert m, line
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    label = '{model_name="meta-llama/Llama-3.1-8B-Instruct"}'
    assert samples["sglang:num_running_reqs" + label] == 0
    assert samples["sglang:num_queue_reqs" + label] == 0
    assert samples["sglang:prompt_tokens_total" + label] == body["meta_info"]["prompt_tokens"]
    assert samples["sglang:generation_tokens_total" + label] == 400
    assert samples["sglang:time_to_first_token_seconds_count" + label] == 1
    assert "sglang:cache_hit_rate" + label in samples


async def test_client_disconnect_mid_stream_aborts(sim_server: Any) -> None:
    url = sim_server.url
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            url + "/generate",
            json={"text": "long story", "sampling_params": {"max_new_tokens": 20000},
                  "stream": True},
        )  # fmt: skip
        first = await resp.content.readline()
        assert first.startswith(b"data:")
        assert await _total_load(s, url) == 1
        resp.close()  # drop the connection mid-stream
        await _wait_idle(s, url, within=1.0)


async def test_client_timeout_while_waiting_aborts(sim_server: Any) -> None:
    url = sim_server.url
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(
                url + "/v1/completions",
                json={"prompt": "x", "max_tokens": 20000},
                timeout=aiohttp.ClientTimeout(total=0.3),
            )
        await _wait_idle(s, url, within=1.0)


async def test_abort_request_by_rid(sim_server: Any) -> None:
    url = sim_server.url
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(
            _post(s, url + "/generate", {"text": "x", "rid": "victim",
                                          "sampling_params": {"max_new_tokens": 20000}})
        )  # fmt: skip
        await asyncio.sleep(0.1)
        status, body = await _post(s, url + "/abort_request", {"rid": "victim"})
        assert status == 200 and body["aborted"] == ["victim"]
        status, out = await asyncio.wait_for(task, 2.0)
        assert status == 200
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        await _wait_idle(s, url, within=1.0)


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/generate", b"{not json", "Invalid JSON"),
        ("/generate", b"[1, 2]", "JSON object"),
        ("/generate", b"{}", "text or input_ids"),
        ("/generate", b'{"text": 5}', "'text'"),
        ("/generate", b'{"input_ids": ["a"]}', "input_ids"),
        ("/generate", b'{"text": "hi", "sampling_params": {"max_new_tokens": "x"}}', "integer"),
        ("/v1/chat/completions", b'{"model": "m"}', "messages"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', "role"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', "n=1"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
        ("/v1/completions", b'{"model": "m"}', "prompt"),
        ("/v1/completions", b'{"prompt": 3}', "prompt"),
        ("/generate", b'{"text": "hi", "priority": "high"}', "priority"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "x"}], "priority": 1.5}', "priority"),
    ],
)  # fmt: skip
async def test_bad_input_is_400(sim_server: Any, path: str, body: bytes, needle: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(sim_server.url + path, data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 400
        err = await r.json()
    message = err["error"]["message"] if "error" in err else err["message"]
    assert needle in message
    if path.startswith("/v1/"):
        assert err["object"] == "error" and err["code"] == 400


async def test_too_long_prompt_is_400(sim_servers: Any) -> None:
    from backends.sim.server import SimServerConfig

    (h,) = await sim_servers(1, config=SimServerConfig(context_length=100, speedup=10))
    async with aiohttp.ClientSession() as s:
        status, body = await _post(s, h.url + "/generate", {"input_ids": list(range(200))})
    assert status == 400 and "context length" in body["error"]["message"]


async def test_http2_probe_is_refused_quietly(
    sim_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"
    reader, writer = await asyncio.open_connection("127.0.0.1", sim_server.port)
    writer.write(preface)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 2.0)
    writer.close()
    assert not reply.startswith(b"HTTP/2") and b"200" not in reply.split(b"\r\n")[0]
    async with aiohttp.ClientSession() as s, s.get(sim_server.url + "/health") as r:
        assert r.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text


async def test_other_bad_http_is_still_logged(
    sim_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim_server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(), 2.0)
    writer.close()
    assert "Error handling request" in caplog.text


def test_sim_command_serves_several_and_stops_on_sigterm(sim_process: Any) -> None:
    import urllib.request

    sp = sim_process(count=2)
    for url in sp.urls:
        with urllib.request.urlopen(url + "/get_server_info", timeout=5) as r:
            assert json.load(r)["port"] == int(url.rsplit(":", 1)[1])
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(10) == 0
    log = sp.log_text()
    assert all(url in log for url in sp.urls)
    assert "Traceback" not in log


async def test_wall_clock_follows_the_engine_model_at_speedup(sim_server: Any) -> None:
    """TTFT and E2E seen by a client = the engine's virtual-time figures / speedup."""
    from backends.sim.api import Finished, FirstToken, SimRequest
    from backends.sim.server import build_engine

    ids = [(i * 7919) % 50000 for i in range(4000)]
    engine, _ = build_engine("llama3-8b-h100", page_size=16)
    engine.add_request(
        SimRequest(rid="x", blocks=page_chain(ids, 16), block_size=16, prompt_tokens=4000,
                   output_tokens=150),
        0.0,
    )  # fmt: skip
    events = engine.advance(1e9)
    ttft = next(e.time for e in events if isinstance(e, FirstToken))
    e2e = next(e.time for e in events if isinstance(e, Finished))
    speedup = sim_server.server.config.speedup
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(
            sim_server.url + "/generate",
            json={"input_ids": ids, "sampling_params": {"max_new_tokens": 150}, "stream": True},
        ) as resp:
            await resp.content.readline()
            first = time.monotonic() - t0
            await resp.read()
            total = time.monotonic() - t0
    assert ttft / speedup * 0.9 <= first <= ttft / speedup + 0.15
    assert e2e / speedup * 0.9 <= total <= e2e / speedup + 0.15


async def test_close_with_streams_in_flight_is_prompt(sim_servers: Any) -> None:
    (h,) = await sim_servers(1, speedup=1.0)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            h.url + "/generate",
            json={"text": "x", "sampling_params": {"max_new_tokens": 20000}, "stream": True},
        )
        await resp.content.readline()
        t0 = time.monotonic()
        await h.close()
        assert time.monotonic() - t0 < 1.5
        rest = await resp.read()
        resp.close()
    assert b'"abort"' in rest or rest == b""
