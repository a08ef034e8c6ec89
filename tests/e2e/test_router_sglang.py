"""Our router in front of two real SGLang 0.5.23 servers (CPU, tiny model): `make e2e` only.

Clients are the real ones: the `openai` SDK (sync, async, streaming), plain HTTP for
`/generate`, and SGLang's own `RuntimeEndpoint`. The destructive test (SIGKILL) runs last.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from servers import Router, SGLangServer, get_json, post_json

# ~300 tokens of the tiny model's tokenizer; a fresh prefix per test keeps them independent
WORDS = "router cache prefix backend token stream request server model engine page block"


def prompt(tag: str, words: int = 240) -> str:
    vocab = WORDS.split()
    return f"[{tag}] " + " ".join(vocab[(i * 7 + len(tag)) % len(vocab)] for i in range(words))


def running(server: SGLangServer) -> int:
    body = get_json(server.url + "/v1/loads")
    return sum(int(e["num_running_reqs"]) + int(e["num_waiting_reqs"]) for e in body["loads"])


def backend_of(router: Router, rid_hint: str | None = None) -> list[str]:
    """Backends of the router's access-log lines, in order (rid_hint: only that endpoint)."""
    lines = re.findall(r"endpoint=(\S+) backend=(\S+) status=\S+ ttft=\S+ cached=(\S+) "
                       r"predicted=(\d+)", router.log_text())  # fmt: skip
    return [b for ep, b, _c, _p in lines if rid_hint is None or ep == rid_hint]


def access_lines(router: Router) -> list[tuple[str, str, str, int]]:
    return [
        (ep, be, cached, int(pred))
        for ep, be, cached, pred in re.findall(
            r"endpoint=(\S+) backend=(\S+) status=\S+ ttft=\S+ cached=(\S+) predicted=(\d+)",
            router.log_text(),
        )
    ]


def wait_log_lines(router: Router, count: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = access_lines(router)
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"router logged {len(access_lines(router))} requests, wanted {count}")


def test_openai_sdk_sync_chat_and_completions(router: Router, model_name: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": prompt("sync-chat", 40)}],
        max_tokens=8,
    )
    assert chat.choices[0].message.content is not None
    assert chat.usage is not None and chat.usage.prompt_tokens > 40
    assert chat.usage.completion_tokens == 8
    comp = client.completions.create(model=model_name, prompt=prompt("sync-comp", 40), max_tokens=8)
    assert isinstance(comp.choices[0].text, str)
    assert comp.usage is not None and comp.usage.completion_tokens == 8


def test_openai_sdk_async_and_streaming(router: Router, model_name: str) -> None:
    from openai import AsyncOpenAI

    async def run() -> tuple[str, Any, str]:
        client = AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": prompt("async-chat", 60)}]
        first = await client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=6
        )
        text = ""
        usage = None
        stream = await client.chat.completions.create(
            model=model_name,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        comp_text = ""
        cstream = await client.completions.create(
            model=model_name, prompt=prompt("async-comp", 30), max_tokens=6, stream=True
        )
        async for c in cstream:
            comp_text += c.choices[0].text if c.choices else ""
        await client.close()
        return first.choices[0].message.content or "", usage, comp_text

    first, usage, comp_text = asyncio.run(run())
    assert first and comp_text
    # the same messages again: the server reports its cache hit through the router
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 16


def test_generate_plain_and_stream(router: Router) -> None:
    body = {"text": prompt("generate", 50), "sampling_params": {"max_new_tokens": 6}}
    status, out = post_json(router.url + "/generate", body)
    assert status == 200 and isinstance(out["text"], str)
    assert out["meta_info"]["completion_tokens"] == 6
    req = urllib.request.Request(
        router.url + "/generate",
        data=json.dumps(dict(body, stream=True)).encode(),
        headers={"content-type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                events.append(json.loads(line[5:]))
    assert len(events) >= 2
    assert events[-1]["meta_info"]["finish_reason"] is not None
    assert events[-1]["meta_info"]["cached_tokens"] >= 48  # the plain call cached the prompt


def test_sglang_runtime_endpoint_drives_the_router(router: Router) -> None:
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(router.url)
    sgl.set_default_backend(backend)

    @sgl.function  # type: ignore[misc]
    def answer(s: Any, question: str) -> None:
        s += "Question: " + question + "\nAnswer:"
        s += sgl.gen("answer", max_tokens=8)

    state = answer.run(question=prompt("runtime-endpoint", 20))
    assert isinstance(state["answer"], str)
    assert any(ep == "/generate" for ep, *_ in access_lines(router))


def test_repeated_prompt_is_cached_on_the_same_backend(router: Router) -> None:
    before = len(access_lines(router))
    text = prompt("repeat", 300)
    reports = []
    for _ in range(3):
        status, out = post_json(
            router.url + "/generate", {"text": text, "sampling_params": {"max_new_tokens": 2}}
        )
        assert status == 200
        reports.append(out["meta_info"])
        time.sleep(0.3)  # the KV events of the first prefill reach the router
    lines = wait_log_lines(router, before + 3)[before:]
    backends = {be for _ep, be, _c, _p in lines}
    assert len(backends) == 1, lines
    n = reports[0]["prompt_tokens"]
    for meta in reports[1:]:
        assert meta["cached_tokens"] >= n - 16  # whole pages of the prompt (page size 16)
    # with the model's tokenizer and the servers' events, the router predicted it exactly
    assert [p for *_x, p in lines[1:]] == [int(m["cached_tokens"]) for m in reports[1:]]


def test_client_disconnect_aborts_on_the_real_server(
    router: Router, sglang: list[SGLangServer]
) -> None:
    body = {
        "text": prompt("disconnect", 30),
        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
        "stream": True,
    }
    parts = urlsplit(router.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/generate", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: the request is decoding on a server
    assert sum(running(s) for s in sglang) >= 1
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    t0 = time.monotonic()
    while sum(running(s) for s in sglang) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    gone_after = time.monotonic() - t0
    assert sum(running(s) for s in sglang) == 0
    assert gone_after < 1.0, f"the server still ran the request {gone_after:.2f} s later"


def test_flush_cache_makes_the_router_forget(router: Router, sglang: list[SGLangServer]) -> None:
    status, _ = post_json(
        router.url + "/generate",
        {"text": prompt("flush", 200), "sampling_params": {"max_new_tokens": 2}},
    )
    assert status == 200
    time.sleep(0.5)
    kv = router.stats()["kv_events"]["backends"]
    assert all(b["source"] == "events" for b in kv.values()), kv
    held = {url: b["index_entries"] for url, b in kv.items()}
    target = max(held, key=lambda u: held[u])
    assert held[target] > 0
    req = urllib.request.Request(target + "/flush_cache", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if router.stats()["kv_events"]["backends"][target]["index_entries"] == 0:
            break
        time.sleep(0.1)
    assert router.stats()["kv_events"]["backends"][target]["index_entries"] == 0


def _assert_openai_error(data: Any, code: str | None = None) -> None:
    assert set(data) == {"error"}
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"] and "File " not in err["message"]
    if code is not None:
        assert err["code"] == code


def test_bad_input_gets_the_same_json_errors(router: Router, model_name: str) -> None:
    req = urllib.request.Request(
        router.url + "/v1/chat/completions",
        data=b"{not json",
        headers={"content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("bad JSON was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        _assert_openai_error(json.loads(exc.read()), "invalid_json")
    # the real server answers this one with a 400 whose message holds a traceback; ours doesn't
    status, data = post_json(
        router.url + "/v1/chat/completions", {"model": model_name, "messages": "nope"}
    )
    assert status == 400
    _assert_openai_error(data)
    status, data = post_json(router.url + "/generate", {"sampling_params": {}})
    assert status == 400
    _assert_openai_error(data)
    status, data = post_json(
        router.url + "/v1/chat/completions",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 404
    _assert_openai_error(data, "model_not_found")


def test_zz_sigkill_fails_over_and_a_restarted_server_rejoins_forgotten(
    router: Router, sglang: list[SGLangServer]
) -> None:
    text = prompt("sigkill", 200)
    for i in range(6):
        post_json(router.url + "/generate",
                  {"text": f"{i} {text}", "sampling_params": {"max_new_tokens": 2}})  # fmt: skip
    time.sleep(0.5)
    # the victim: the server the router believes holds the most (whichever got the traffic)
    held = {u: b["index_entries"] for u, b in router.stats()["kv_events"]["backends"].items()}
    victim = next(s for s in sglang if s.url == max(held, key=lambda u: held[u]))
    held_before = held[victim.url]
    assert held_before > 0
    pgid = int(Path(victim.log_path).with_suffix(".pgid").read_text())
    import os
    import signal

    os.killpg(pgid, signal.SIGKILL)
    # its KV event connection drops: the router forgets what the dead server held
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kv = router.stats()["kv_events"]["backends"][victim.url]
        if kv["disconnects"] >= 1 and kv["index_entries"] == 0:
            break
        time.sleep(0.2)
    assert kv["disconnects"] >= 1 and kv["index_entries"] == 0, kv
    # every request after the kill succeeds: refused connections are retried elsewhere
    for i in range(6):
        status, out = post_json(
            router.url + "/generate",
            {"text": f"after {i} {text}", "sampling_params": {"max_new_tokens": 2}},
        )
        assert status == 200, out
    victim.proc = None
    victim.start()  # same ports: the router's pool and subscription find it again
    victim.wait_healthy(240)
    deadline = time.monotonic() + 30
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = router.stats()
        row = next(b for b in stats["backends"] if b["url"] == victim.url)
        kv = stats["kv_events"]["backends"].get(victim.url, {})
        if row["healthy"]:
            break
        time.sleep(0.5)
    assert row["healthy"]
    kv = router.stats()["kv_events"]["backends"][victim.url]
    assert kv["source"] == "events"
    assert kv["index_entries"] < held_before  # only what the new process cached (its warm-up)
    status, _ = post_json(
        router.url + "/generate", {"text": text, "sampling_params": {"max_new_tokens": 2}}
    )
    assert status == 200
