"""Every bad input gets an OpenAI-style JSON error with the right status, and disturbs nothing."""

from __future__ import annotations

from typing import Any

import aiohttp
from server_fixtures import router_for, sims

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHAT = "/v1/chat/completions"


def _assert_openai_error(data: Any, code: str | None = None) -> None:
    assert set(data) == {"error"}
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code


async def _post(
    s: aiohttp.ClientSession, url: str, data: bytes | None = None, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with s.post(url, data=data, **kw) as r:
        return r.status, await r.json(), r


async def test_bad_inputs_each_get_a_json_4xx() -> None:
    async with (
        sims(1) as handles,
        router_for(
            [handles[0].url], max_body_bytes=4096, api_keys=["client-key"], admin_key="admin-key"
        ) as router,
    ):
        base = router.url
        auth = {"Authorization": "Bearer client-key"}
        async with aiohttp.ClientSession() as s:
            # malformed JSON
            status, data, _ = await _post(s, base + CHAT, b"{not json", headers=auth)
            assert status == 400
            _assert_openai_error(data, "invalid_json")
            # a JSON array, not an object
            status, data, _ = await _post(s, base + CHAT, b"[1, 2]", headers=auth)
            assert status == 400
            _assert_openai_error(data)
            # missing messages
            status, data, _ = await _post(s, base + CHAT, json={"model": MODEL}, headers=auth)
            assert status == 400 and "messages" in data["error"]["message"]
            _assert_openai_error(data)
            # wrong types
            for bad in (
                {"model": MODEL, "messages": "hello"},
                {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
                {"model": 7, "messages": [{"role": "user", "content": "x"}]},
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
            ):
                status, data, _ = await _post(s, base + CHAT, json=bad, headers=auth)
                assert status == 400, bad
                _assert_openai_error(data)
            status, data, _ = await _post(s, base + "/generate", json={"text": 3}, headers=auth)
            assert status == 400
            _assert_openai_error(data)
            # unknown model
            body = {"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}
            status, data, _ = await _post(s, base + CHAT, json=body, headers=auth)
            assert status == 404
            _assert_openai_error(data, "model_not_found")
            assert data["error"]["param"] == "model"
            # body over the size limit
            big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 10_000}]}
            status, data, _ = await _post(s, base + CHAT, json=big, headers=auth)
            assert status == 413
            _assert_openai_error(data, "request_too_large")
            # missing and wrong API key
            ok = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            status, data, r = await _post(s, base + CHAT, json=ok)
            assert status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            _assert_openai_error(data, "missing_api_key")
            status, data, _ = await _post(
                s, base + CHAT, json=ok, headers={"Authorization": "Bearer nope"}
            )
            assert status == 401
            _assert_openai_error(data, "invalid_api_key")
            async with s.get(base + "/v1/models") as r:
                assert r.status == 401
            # admin calls: no key 401, client key 403, admin key 200
            async with s.get(base + "/admin/backends") as r:
                assert r.status == 401
                _assert_openai_error(await r.json())
            async with s.get(base + "/admin/backends", headers=auth) as r:
                assert r.status == 403
                _assert_openai_error(await r.json(), "insufficient_permissions")
            admin = {"Authorization": "Bearer admin-key"}
            async with s.get(base + "/admin/backends", headers=admin) as r:
                assert r.status == 200
            # unknown path and wrong method are JSON too
            async with s.get(base + "/v1/nothing") as r:
                assert r.status == 404
                _assert_openai_error(await r.json())
            async with s.get(base + CHAT) as r:
                assert r.status == 405
                _assert_openai_error(await r.json())
            # nothing else disturbed: a good request still works, nothing left in flight
            status, data, _ = await _post(s, base + CHAT, json=ok, headers=auth)
            assert status == 200 and data["choices"][0]["message"]["content"]
            assert all(b.load == 0 for b in router.state.core.backends())


async def test_no_healthy_backend_is_503_with_retry_after() -> None:
    # a port nobody listens on: discovery fails, the backend never becomes healthy
    async with router_for(["http://127.0.0.1:9"]) as router, aiohttp.ClientSession() as s:
        async with s.get(router.url + "/readiness") as r:
            assert r.status == 503
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        status, data, r = await _post(s, router.url + CHAT, json=body)
        assert status == 503
        assert r.headers["Retry-After"] == "1"
        _assert_openai_error(data, "no_healthy_backend")
        async with s.get(router.url + "/health") as r:
            assert r.status == 200  # the router itself is fine


async def test_admin_add_drain_remove() -> None:
    async with (
        sims(2) as handles,
        router_for([handles[0].url], admin_key="admin-key") as router,
        aiohttp.ClientSession(headers={"Authorization": "Bearer admin-key"}) as s,
    ):
        async with s.post(router.url + "/admin/backends", json={"url": handles[1].url}) as r:
            assert r.status == 201
            added = (await r.json())["backend"]
            assert added["healthy"] is True and added["kv_capacity_tokens"]
        async with s.post(router.url + "/admin/backends/drain", json={"url": handles[0].url}) as r:
            assert (await r.json())["backend"]["draining"] is True
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for _ in range(3):
            async with s.post(router.url + CHAT, json=body) as r:
                assert r.headers["X-Prefix-Router-Backend"] == handles[1].url
        async with s.delete(router.url + "/admin/backends", json={"url": handles[1].url}) as r:
            assert r.status == 200
        async with s.delete(router.url + "/admin/backends", json={"url": handles[1].url}) as r:
            assert r.status == 404
        async with s.get(router.url + "/admin/backends") as r:
            listed = (await r.json())["backends"]
            assert [b["url"] for b in listed] == [handles[0].url]
