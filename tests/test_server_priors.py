"""Every backend's BackendSpec gets its profile's prior and its HiCache host pool, live.

Real simulated SGLang servers and a real router on 127.0.0.1; a tiny aiohttp app plays a real
SGLang that reports its hierarchical-cache server args, which the simulator does not.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import serving
from server_fixtures import router_for, sims

from backends.sglang import parse_server_info
from backends.sim.perf import get_profile
from router.commands import serve as serve_command
from router.core.model import BackendSpec
from router.priors import prior_named
from router.server.app import RunningServer
from router.server.config import load_config


def _specs(router: RunningServer) -> dict[str, BackendSpec]:
    return {state.id: state.spec for state in router.state.core.backends()}


def test_server_info_reads_hicache_args() -> None:
    base = {"model_path": "m", "max_total_num_tokens": 1000, "tp_size": 2}
    assert parse_server_info(base).host_cache_tokens() is None  # silent: not reported
    off = parse_server_info({**base, "enable_hierarchical_cache": False, "hicache_ratio": 3})
    assert off.host_cache_tokens() == 0
    ratio = parse_server_info({**base, "enable_hierarchical_cache": True, "hicache_ratio": 3.0})
    assert ratio.hierarchical_cache is True and ratio.hicache_ratio == 3.0
    assert ratio.host_cache_tokens() == 3000
    default_ratio = parse_server_info({**base, "enable_hierarchical_cache": True})
    assert default_ratio.host_cache_tokens() == 2000  # SGLang's default hicache_ratio is 2
    # hicache_size GB per rank overrides the ratio when the KV bytes per token are known:
    # 2 ranks of a model with 1e6 bytes/token hold 5e5 bytes/token each -> 10 GB = 20,000
    sized = {**base, "enable_hierarchical_cache": True, "hicache_ratio": 3, "hicache_size": 10}
    info = parse_server_info(sized)
    assert info.hicache_size_gb == 10.0
    assert info.host_cache_tokens(1e6) == 20_000
    assert info.host_cache_tokens() == 3000  # bytes unknown: the ratio


def test_backend_profiles_parse_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(
        None,
        profile="llama3-8b-a100",
        backend_profiles=["gpu2:30000=llama3-70b-h100-tp4", "http://gpu3:1/=llama3-8b-h100"],
    )
    assert cfg.profile_for("http://gpu2:30000") == "llama3-70b-h100-tp4"
    assert cfg.profile_for("gpu3:1") == "llama3-8b-h100"
    assert cfg.profile_for("http://other:1") == "llama3-8b-a100"
    assert load_config(None).profile_for("http://x:1") == "llama3-8b-h100"
    monkeypatch.setenv("PREFIX_ROUTER_BACKEND_PROFILES", "a:1=llama3-8b-a100,b:2=llama3-8b-h100")
    assert load_config(None).backend_profiles == {
        "http://a:1": "llama3-8b-a100",
        "http://b:2": "llama3-8b-h100",
    }
    monkeypatch.delenv("PREFIX_ROUTER_BACKEND_PROFILES")
    with pytest.raises(ValueError, match="known profiles"):
        load_config(None, profile="no-such-gpu")
    with pytest.raises(ValueError, match="known profiles"):
        load_config(None, backend_profiles=["a:1=no-such-gpu"])
    with pytest.raises(ValueError, match="URL=PROFILE"):
        load_config(None, backend_profiles=["a:1"])


def test_serve_rejects_an_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    args = parser.parse_args(["--backend", "127.0.0.1:1", "--backend-profile", "x:1=nope"])
    assert serve_command.run(args) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


async def test_external_backends_get_their_profiles_priors() -> None:
    async with (
        sims(2) as handles,
        router_for(
            [h.url for h in handles],
            policy="cost",
            profile="llama3-8b-a100",
            backend_profiles={handles[1].url: "llama3-8b-h100-hicache"},
        ) as router,
    ):
        specs = _specs(router)
        first, second = specs[handles[0].url], specs[handles[1].url]
        assert first.prior == prior_named("llama3-8b-a100")
        assert second.prior == prior_named("llama3-8b-h100-hicache")
        assert first.kv_capacity_tokens == get_profile("llama3-8b-h100").kv_capacity_tokens
        # the simulator says nothing of HiCache: the profile's host pool stands
        assert first.host_cache_tokens == 0
        assert (
            second.host_cache_tokens == get_profile("llama3-8b-h100-hicache").host_capacity_tokens
        )
        # the cost policy starts from the prior: /stats shows it before any traffic
        async with aiohttp.ClientSession() as s, s.get(router.url + "/stats") as r:
            rows = {row["url"]: row for row in (await r.json())["backends"]}
        row = rows[handles[0].url]
        assert row["profile"] == "llama3-8b-a100"
        learned = row["learned"]["prefill_tokens_per_s"]
        assert learned == pytest.approx(prior_named("llama3-8b-a100").prefill_tokens_per_s)
        assert rows[handles[1].url]["host_cache_tokens"] == second.host_cache_tokens


async def test_default_profile_applies_without_flags() -> None:
    async with sims(1) as handles, router_for([handles[0].url]) as router:
        assert _specs(router)[handles[0].url].prior == prior_named("llama3-8b-h100")


@asynccontextmanager
async def fake_sglang(server_info: dict[str, Any]) -> AsyncIterator[str]:
    """Just enough of SGLang for discovery and health: what /get_server_info says is ours."""

    async def info(request: web.Request) -> web.Response:
        return web.json_response(server_info)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/get_server_info", info)
    app.router.add_get("/health", health)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


async def test_host_pool_from_sglang_server_args() -> None:
    common = {"served_model_name": "m", "max_total_num_tokens": 50_000, "page_size": 16}
    async with (
        fake_sglang({**common, "enable_hierarchical_cache": True, "hicache_ratio": 3}) as on,
        fake_sglang({**common, "enable_hierarchical_cache": False, "hicache_ratio": 3}) as off,
        router_for([on, off], profile="llama3-8b-h100-hicache") as router,
    ):
        specs = _specs(router)
        assert specs[on].host_cache_tokens == 150_000  # the server's word beats the profile
        assert specs[off].host_cache_tokens == 0
        assert specs[on].cache_capacity_tokens == 200_000
        async with (
            aiohttp.ClientSession() as s,
            s.get(router.url + "/admin/backends") as r,
        ):
            assert r.status == 403  # admin API is off without --admin-key
            assert (await r.json())["error"]["code"] == "admin_disabled"


async def test_admin_add_with_a_profile() -> None:
    admin = {"Authorization": "Bearer k"}
    async with (
        sims(1) as handles,
        router_for([], admin_key="k") as router,
        aiohttp.ClientSession(headers=admin) as s,
    ):
        url = handles[0].url
        body = {"url": url, "profile": "nope"}
        async with s.post(router.url + "/admin/backends", json=body) as r:
            assert r.status == 400
            assert "known profiles" in (await r.json())["error"]["message"]
        body = {"url": url, "profile": "llama3-70b-h100-tp4"}
        async with s.post(router.url + "/admin/backends", json=body) as r:
            assert r.status == 201
            described = (await r.json())["backend"]
        assert described["profile"] == "llama3-70b-h100-tp4"
        assert described["host_cache_tokens"] == 0
        assert _specs(router)[url].prior == prior_named("llama3-70b-h100-tp4")
