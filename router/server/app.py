"""The aiohttp application: one factory, one ClientSession, one routing core per app.

`create_app(config)` returns an `web.Application` whose `cleanup_ctx` builds, on startup and
inside the running loop, everything with a lifetime: the policy and `RoutingCore`, the
tokenizer and `BlockHasher` (only when the policy reads blocks), one `aiohttp.ClientSession`
for all upstream traffic, the `BackendPool` (first health round before the app takes
requests, so a pool of live backends is ready at once) and the handlers. On shutdown it stops
health checks, waits briefly for pending upstream aborts and closes the session.

Shared state (`--state`, docs/replicas.md): a `StateSync` over `open_state(config.state)` links
this replica's core to the other replicas'. With the default "memory" state it starts nothing
and its calls return at once; with Redis it starts its publish/consume/heartbeat tasks after
the first health round and is stopped (brief flush, heartbeat key deleted) after the pool.

`start_server(config)` runs the app on a TCP site with handler cancellation on: a client that
disconnects cancels its handler at once, which is how the proxy learns to abort upstream
without waiting for the next chunk.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from router.core.blocks import BlockHasher
from router.core.chat_template import load_chat_template
from router.core.model import Policy
from router.core.policies import POLICIES, make_policy
from router.core.routing import RoutingCore
from router.core.tokens import HFTokenizer, load_tokenizer
from router.server.admin import AdminApi
from router.server.auth import check_status
from router.server.config import ServerConfig
from router.server.errors import error_middleware
from router.server.kv_events import KVEventsManager
from router.server.metrics import RouterMetrics
from router.server.pd import PDProxy, PDSetup
from router.server.pool import BackendPool
from router.server.protocol import JsonErrorRunner
from router.server.proxy import Proxy
from router.server.record_admin import RecordControl
from router.server.scheduling import SchedulerDriver, scheduler_config
from router.server.sglang_compat import ModelInfoRelay
from router.server.siblings import Siblings
from router.server.status import PoolView, StatusApi
from router.state import StateSync, SyncConfig, open_state

__all__ = [
    "STATE",
    "RouterState",
    "RunningServer",
    "build_policy",
    "create_app",
    "start_server",
]

log = logging.getLogger("router.server")


@dataclass(slots=True, kw_only=True)
class RouterState:
    """Everything one app owns while it runs."""

    config: ServerConfig
    policy_name: str
    policy: Policy
    core: RoutingCore
    session: aiohttp.ClientSession
    pool: BackendPool
    proxy: Proxy
    status: StatusApi
    admin: AdminApi
    metrics: RouterMetrics
    sync: StateSync
    model_info: ModelInfoRelay
    record: RecordControl


STATE = web.AppKey("prefix_router_state", RouterState)


def build_policy(config: ServerConfig) -> tuple[str, Policy]:
    """The configured policy, or the default: "cost" when registered, else "cache_aware"."""
    name = config.policy or ("cost" if "cost" in POLICIES else "cache_aware")
    return name, make_policy(name, rng=random.Random(config.seed), **config.policy_options)


def _make_hasher(config: ServerConfig, policy: Policy) -> BlockHasher | None:
    """Tokenizer and hasher, only for policies that read blocks (loading costs a moment)."""
    if not policy.needs_blocks and config.record is None:  # a recording needs blocks too
        return None
    tokenizer = load_tokenizer(config.tokenizer)
    # the model's own tokenizer: chats are rendered by its template, as the engine does
    template = load_chat_template(config.tokenizer) if isinstance(tokenizer, HFTokenizer) else None
    return BlockHasher(tokenizer, block_tokens=config.block_tokens, chat_template=template)


async def _lifecycle(config: ServerConfig, app: web.Application) -> AsyncIterator[None]:
    pd = PDSetup.build(config) if config.prefill else None  # PD mode: router/server/pd.py
    if pd is None:
        policy_name, policy = build_policy(config)
        core = RoutingCore(policy, [])
    else:  # the prefill side is the core that status, KV events and replicas follow
        policy_name, policy, core = pd.name, pd.pd.prefill.policy, pd.pd.prefill
    shared = open_state(config.state, cluster=config.cluster, replica=config.replica_id)
    # workers of one router batch their events over ~2 ms: fewer wakeups per request in every
    # process, at a sync delay far below any request's time (docs/workers.md)
    worker = config.worker_index is not None
    sync = StateSync(core, shared, SyncConfig(linger_s=0.002) if worker else None)
    metrics = RouterMetrics()
    hasher = _make_hasher(config, policy)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    # no cookies, no compression, none of the client's default headers: a relay's session
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )

    def new_pool(of: RoutingCore) -> BackendPool:
        return BackendPool(
            of,
            session,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
            breaker_failures=config.breaker_failures,
            breaker_cooldown_s=config.breaker_cooldown_s,
            profile_for=config.profile_for,
        )

    pool = new_pool(core)
    proxy_args: dict[str, Any] = {"config": config, "policy": policy, "session": session}
    proxy_args.update(metrics=metrics, hasher=hasher, sync=sync)
    if pd is None:
        proxy = Proxy(core=core, pool=pool, **proxy_args)
    else:
        pd.decode_pool = new_pool(pd.pd.decode)
        proxy = PDProxy(
            setup=pd, prefill_pool=pool, core=pd.pd.decode, pool=pd.decode_pool, **proxy_args
        )
    state = RouterState(
        config=config,
        policy_name=policy_name,
        policy=policy,
        core=core,
        session=session,
        pool=pool,
        proxy=proxy,
        status=StatusApi(core, policy, pool, metrics, policy_name, sync=sync),
        admin=AdminApi(config, pool),
        metrics=metrics,
        sync=sync,
        model_info=ModelInfoRelay(pool, session, config.health_timeout_s),
        record=RecordControl(config, proxy, policy_name=policy_name, replica=sync.replica),
    )
    if pd is not None:
        state.status.decode = PoolView(pd.pd.decode, pd.pool())  # /stats, /readiness
        state.status.pd_stats = pd.pd.hold_stats
    kv_events = KVEventsManager(policy, hasher, config.kv_events, config.kv_event_endpoints)
    pool.observers.append(kv_events)
    state.status.kv_events = kv_events
    if config.scheduler:
        proxy.scheduling = SchedulerDriver.build(core, scheduler_config(config), metrics)
        state.status.scheduler_stats = proxy.scheduling.stats
    app[STATE] = state
    for url in config.backends if pd is None else pd.prefill_urls:
        pool.add(url)
    if pd is not None:
        for url in pd.decode_urls:
            pd.pool().add(url)
    try:
        await pool.start()
        if pd is not None:
            await pd.pool().start()
        await sync.start()
        if config.record is not None:
            state.record.start(config.record)
    except BaseException:
        await pool.stop()
        if pd is not None:
            await pd.pool().stop()
        await kv_events.stop()
        await sync.stop()  # closes the store's connections
        await session.close()
        raise
    log.info(
        "router ready: policy=%s backends=%d state=%s",
        policy_name,
        len(pool.entries),
        "memory" if not sync.enabled else f"shared (replica {sync.replica})",
    )
    try:
        yield
    finally:
        await state.record.stop()
        await pool.stop()
        if pd is not None:
            await pd.pool().stop()
        await kv_events.stop()
        await sync.stop()
        if proxy.background:
            await asyncio.wait(set(proxy.background), timeout=config.abort_timeout_s)
        proxy.close()
        if proxy.scheduling is not None:
            proxy.scheduling.close()
        await session.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _late(pick: Callable[[RouterState], Handler]) -> Handler:
    """A route whose handler exists only once the app started (state built in cleanup_ctx)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return await pick(request.app[STATE])(request)

    return handler


def _status(pick: Callable[[RouterState], Handler]) -> Handler:
    """A status route: behind a client or admin key with `--protect-status`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        if state.config.protect_status:
            check_status(request, state.config.api_keys, state.config.admin_key)
        return await pick(state)(request)

    return handler


def create_app(config: ServerConfig) -> web.Application:
    """The router as an aiohttp app; bodies over `max_body_bytes` get a 413 JSON error."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async for _ in _lifecycle(config, app):
            yield

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    r.add_post("/v1/chat/completions", _late(lambda s: s.proxy.chat))
    r.add_post("/v1/completions", _late(lambda s: s.proxy.completions))
    r.add_post("/generate", _late(lambda s: s.proxy.generate))
    r.add_get("/v1/models", _late(lambda s: s.proxy.models))
    for path in ("/get_model_info", "/model_info"):  # what sglang.RuntimeEndpoint asks first
        r.add_get(path, _late(lambda s: s.model_info.model_info))
    r.add_get("/health", _late(lambda s: s.status.health))
    r.add_get("/readiness", _late(lambda s: s.status.readiness))
    r.add_get("/admin/backends", _late(lambda s: s.admin.list))
    sib = Siblings.of(config)  # serve --workers N: answer for every worker (siblings.py)
    if sib is None:
        r.add_get("/stats", _status(lambda s: s.status.stats))
        r.add_get("/metrics", _status(lambda s: s.status.prometheus))
        r.add_post("/admin/backends", _late(lambda s: s.admin.add))
        r.add_delete("/admin/backends", _late(lambda s: s.admin.remove))
        r.add_post("/admin/backends/drain", _late(lambda s: s.admin.drain))
    else:
        r.add_get("/stats", _status(lambda s: partial(sib.stats, local=s.status.stats_body)))
        r.add_get("/metrics", _status(lambda s: partial(sib.metrics, local=s.status.prometheus)))
        r.add_post("/admin/backends", _late(lambda s: partial(sib.fan_out, local=s.admin.add)))
        r.add_delete("/admin/backends", _late(lambda s: partial(sib.fan_out, local=s.admin.remove)))
        r.add_post(
            "/admin/backends/drain", _late(lambda s: partial(sib.fan_out, local=s.admin.drain))
        )
    r.add_get("/admin/record", _late(lambda s: s.record.get))
    r.add_post("/admin/record", _late(lambda s: s.record.post))
    r.add_delete("/admin/record", _late(lambda s: s.record.delete))
    return app


def _hot_routes(state: RouterState) -> dict[tuple[str, str], Handler]:
    """The model endpoints, bound once: they skip the app's router (fastpath.py)."""
    proxy = state.proxy
    return {
        ("POST", "/v1/chat/completions"): proxy.chat,
        ("POST", "/v1/completions"): proxy.completions,
        ("POST", "/generate"): proxy.generate,
    }


@dataclass(slots=True, kw_only=True)
class RunningServer:
    """A started router: its URL, its app (for state in tests) and how to stop it."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> RouterState:
        return self.app[STATE]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(config: ServerConfig) -> RunningServer:
    """Start the router on config.host:config.port (port 0: any free port)."""
    app = create_app(config)
    runner = JsonErrorRunner(  # parser errors (oversized headers...) as JSON too
        app,
        hot=lambda: _hot_routes(app[STATE]),
        handler_cancellation=True,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.shutdown_timeout_s,
    )
    await runner.setup()
    # a worker of `serve --workers N` shares the port with its siblings (the kernel spreads
    # connections over them) and answers them on its own control socket (siblings.py)
    worker = config.worker_index is not None
    site = web.TCPSite(runner, config.host, config.port, reuse_port=worker or None)
    await site.start()
    if worker:
        await web.UnixSite(runner, config.worker_sockets[config.worker_index or 0]).start()
    port = runner.addresses[0][1] if runner.addresses else config.port
    return RunningServer(url=f"http://{config.host}:{port}", app=app, runner=runner)
