"""The model check over a pool of backends serving different models (`BackendPool.unfit`).

Two simulated backends over HTTP, one serving model "a" and one "b", behind a round-robin
router: each model's requests go only to its backend, an unknown model is a 404
`model_not_found`, and /generate (no model field) may go to either.
"""

from __future__ import annotations

import aiohttp

from backends.sim.server import start_sim_servers
from tests.server_fixtures import router_for


async def test_requests_go_only_to_backends_serving_their_model() -> None:
    a = (await start_sim_servers(1, model="a", speedup=20.0))[0]
    b = (await start_sim_servers(1, model="b", speedup=20.0))[0]
    try:
        async with router_for([a.url, b.url]) as router, aiohttp.ClientSession() as s:
            assert set(router.state.pool.models()) == {"a", "b"}
            for model, url in (("a", a.url), ("b", b.url)) * 3:
                body = {"model": model, "prompt": "hi", "max_tokens": 2}
                async with s.post(router.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    assert r.headers["X-Prefix-Router-Backend"] == url.rstrip("/")
            body = {"model": "c", "prompt": "hi", "max_tokens": 2}
            async with s.post(router.url + "/v1/completions", json=body) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "model_not_found"
            seen = set()
            for _ in range(4):
                gen = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
                async with s.post(router.url + "/generate", json=gen) as r:
                    assert r.status == 200
                    seen.add(r.headers["X-Prefix-Router-Backend"])
            assert seen == {a.url.rstrip("/"), b.url.rstrip("/")}
    finally:
        await a.close()
        await b.close()
