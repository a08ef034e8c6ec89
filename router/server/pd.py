"""PD mode of the live proxy: one request, a prefill server and a decode server.

`serve --prefill URL [BOOTSTRAP_PORT] --decode URL` (each repeatable) speaks SGLang's PD
protocol the way its gateways do (SMG's `pd_router.rs`): per request the router picks a pair
(router/core/pd.py: priced together by default, or by `--prefill-policy` / `--decode-policy`
each on its own), adds `bootstrap_host` (the prefill server's host), `bootstrap_port` and a
random 63-bit `bootstrap_room` to the client's JSON, sends it to both servers at once on the
same path, and relays the decode server's answer to the client (streamed or not). The prefill
server's own answer (one token) is read to its end: it says when the prefill finished and
how much of the prompt was cached, which the prefill side's cost model learns from.

Failures, as in the mixed pool, are retried only before the first byte reaches the client:
a prefill server that refuses the connection or answers 5xx cancels the decode request (the
decode server then aborts it) and the next attempt excludes that prefill server; a decode
server that fails does the same the other way round. A 4xx from the prefill server goes back to
the client as it came. Both pools are health-checked by their own `BackendPool`; the reported
cached tokens of a request are the prefill server's (the decode server computed nothing).

`PDProxy` is the mixed proxy (router/server/proxy.py) with three hooks replaced: `_route`
(a pair), `_attempt` (two requests) and `_report_failure` (the pool of the side that failed);
the relay, feedback, retries and error handling are the mixed proxy's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from backends.sglang import TokenUsage, usage_from_sse_chunk
from router.core.model import RouteRequest
from router.core.pd import PairConfig, PDDecision, PDRouter
from router.core.policies import make_policy
from router.core.routing import Decision, RoutingCore
from router.server.config import ServerConfig, normalise_url
from router.server.errors import ApiError
from router.server.metrics import TTFT_BUCKETS, Gauge, Histogram
from router.server.pool import BackendPool
from router.server.proxy import (
    Endpoint,
    Proxy,
    _body_usage,
    _Flight,
    _UpstreamFailed,
)
from router.server.sse import data_of as _data_of
from router.server.sse import split_events as _split_events

__all__ = ["PDProxy", "PDSetup", "parse_prefill", "with_bootstrap"]

_ROOMS = random.SystemRandom()


def parse_prefill(item: str, default_port: int) -> tuple[str, int]:
    """'URL' or 'URL PORT' (SMG's `--prefill URL PORT`) -> (normalised URL, bootstrap port)."""
    parts = item.split()
    if not parts or len(parts) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {item!r}")
    port = default_port
    if len(parts) == 2:
        if not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
            raise ValueError(
                f"bootstrap port of {parts[0]} must be a port number, got {parts[1]!r}"
            )
        port = int(parts[1])
    return normalise_url(parts[0]), port


def with_bootstrap(payload: bytes, host: str, port: int, room: int) -> bytes:
    """The JSON object `payload` with the three bootstrap fields set (spliced when new)."""
    extra = {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}
    end = payload.rstrip().rfind(b"}")
    if b'"bootstrap_' in payload or end < 0:
        body = orjson.loads(payload)
        body.update(extra)
        return orjson.dumps(body)
    tail = orjson.dumps(extra)[1:]  # '"bootstrap_host":...}'
    head = payload[:end].rstrip()
    sep = b"," if not head.endswith(b"{") else b""
    return head + sep + tail


@dataclass(slots=True, kw_only=True)
class PDSetup:
    """What PD mode adds to the app: the pair router, the decode pool, the bootstrap ports."""

    name: str
    pd: PDRouter
    prefill_urls: dict[str, int]  # URL -> bootstrap port
    decode_urls: list[str]
    decode_pool: BackendPool | None = None

    @classmethod
    def build(cls, config: ServerConfig) -> PDSetup:
        from backends.sim.perf import get_profile

        prefill = dict(parse_prefill(p, config.bootstrap_port) for p in config.prefill)
        seed = config.seed
        profile = get_profile(config.profile_for(next(iter(prefill))))
        pair: PairConfig | None = None
        if config.prefill_policy is None and config.decode_policy is None:
            ppolicy = make_policy("cost", rng=random.Random(seed), **config.policy_options)
            dpolicy = make_policy("pd_decode", rng=random.Random(seed + 1))
            pair = PairConfig(
                kv_bytes_per_token=profile.kv_bytes_per_token(),
                link_bytes_per_s=profile.kv_link_bytes_per_s,
            )
            name = "pd:pair"
        else:
            pname = config.prefill_policy or "cache_aware"
            dname = config.decode_policy or "power_of_two"
            ppolicy = make_policy(pname, rng=random.Random(seed))
            dpolicy = make_policy(dname, rng=random.Random(seed + 1))
            name = f"pd:{pname}+{dname}"
        pd = PDRouter(
            RoutingCore(ppolicy, []),
            RoutingCore(dpolicy, []),
            pair=pair,
            hold_prefill=pair is None,
            room_hold=pair is not None and config.pd_room_hold,
            tpot_slo_s=config.slo_tpot_s if pair is not None else None,
        )
        return cls(
            name=name,
            pd=pd,
            prefill_urls=prefill,
            decode_urls=[normalise_url(u) for u in config.decode],
        )

    def pool(self) -> BackendPool:
        """The decode servers' pool (set when the app builds it)."""
        if self.decode_pool is None:
            raise RuntimeError("the decode pool is built by the app's lifecycle")
        return self.decode_pool

    def bootstrap(self, prefill_url: str) -> tuple[str, int]:
        host = urlsplit(prefill_url).hostname or "127.0.0.1"
        return host, self.prefill_urls.get(prefill_url, 8998)


class PDProxy(Proxy):
    """The proxy with a pair per request; see the module docstring.

    Built like `Proxy` with the decode side's core and pool (what the relay reports to), plus
    the `PDSetup` and the prefill pool.
    """

    def __init__(self, *, setup: PDSetup, prefill_pool: BackendPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.setup = setup
        self.pd = setup.pd
        self.prefill_pool = prefill_pool
        self._prefill_of: dict[str, str] = {}
        self._prefill_cached: dict[str, int | None] = {}
        self._held: dict[str, asyncio.Future[PDDecision]] = {}  # waiting for decode room
        registry = self.metrics.registry
        self.held_gauge = registry.register(
            Gauge("prefix_router_pd_held", "Requests held in the router for decode KV room.")
        )
        self.room_wait = registry.register(
            Histogram(
                "prefix_router_pd_room_wait_seconds",
                "Time requests waited in the router for decode KV room (held ones only).",
                (),
                TTFT_BUCKETS,
            )
        )
        registry.collectors.append(lambda: self.held_gauge.set(value=float(self.pd.held)))
        for side in (prefill_pool, self.pool):
            side.on_routable.append(self._routable_again)

    def _route(self, route_req: RouteRequest, now: float, exclude: set[str]) -> Decision | None:
        prefill_ids = self.prefill_pool.entries
        decision = self.pd.submit(
            route_req,
            now,
            exclude_prefill={b for b in exclude if b in prefill_ids},
            exclude_decode={b for b in exclude if b not in prefill_ids},
        )
        return None if decision is None else self._bind(route_req.rid, decision)

    def _bind(self, rid: str, decision: PDDecision) -> Decision:
        self._prefill_of[rid] = decision.prefill.backend
        return replace(
            decision.decode, predicted_cached_tokens=decision.prefill.predicted_cached_tokens
        )

    async def _wait_for_route(self, route_req: RouteRequest) -> Decision:
        """Held for decode room (router/core/pd.py): wait until `_release` binds it."""
        rid = route_req.rid
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PDDecision] = loop.create_future()
        self._held[rid] = future
        started = loop.time()
        try:
            decision = await asyncio.wait_for(future, self.config.queue_timeout_s)
        except TimeoutError:
            self.pd.cancel(rid)
            raise ApiError(
                429,
                f"no decode server had KV room for this request within "
                f"{self.config.queue_timeout_s:g} s",
                code="router_queue_timeout",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.pd.on_failed(rid, loop.time())  # bound as the client left: end it
            else:
                self.pd.cancel(rid)
            raise
        finally:
            self._held.pop(rid, None)
        self.room_wait.observe(value=loop.time() - started)
        return self._bind(rid, decision)

    def _release(self) -> None:
        """Decode room freed or a server came back: bind the held requests that fit now."""
        if not self.pd.held:
            return
        now = asyncio.get_running_loop().time()
        for req, decision in self.pd.release(now):
            future = self._held.get(req.rid)
            if future is not None and not future.done():
                future.set_result(decision)
            else:
                self.pd.on_failed(req.rid, now)  # its client is gone

    def _routable_again(self) -> None:
        """A prefill or decode server came back: a held request may go now."""
        self.pd.backends_changed()
        self._release()

    def _report_failure(self, backend: str, now: float, failed: _UpstreamFailed) -> None:
        pool = self.prefill_pool if backend in self.prefill_pool.entries else self.pool
        pool.report_failure(backend, now, failed.reason, trip=failed.trip)

    def _first_token(self, flight: _Flight, cached: int | None) -> None:
        if flight.ttft_s is None and self.pd.prefill_open(flight.rid):
            # the decode side cannot answer before the prefill did: its answer is on its way
            self.pd.on_prefill_done(flight.rid, asyncio.get_running_loop().time())
        super()._first_token(flight, self._prefill_cached.get(flight.rid, cached))

    def _end(self, flight: _Flight, *, ok: bool) -> None:
        if not flight.ended and flight.backend is not None:
            now = asyncio.get_running_loop().time()
            cached = self._prefill_cached.pop(flight.rid, None)
            if ok:
                self.pd.on_prefill_done(flight.rid, now, cached)
                if flight.usage is not None and cached is not None:
                    flight.usage = replace(flight.usage, cached_tokens=cached)
            else:
                self.pd.on_prefill_failed(flight.rid, now)
            self.pd.free_room(flight.rid)
        super()._end(flight, ok=ok)
        self._release()

    async def _attempt(
        self,
        request: web.Request,
        endpoint: Endpoint,
        flight: _Flight,
        payload: bytes,
        *,
        stream: bool,
        strip_usage: bool,
    ) -> web.StreamResponse:
        prefill = self._prefill_of.pop(flight.rid)
        host, port = self.setup.bootstrap(prefill)
        payload = with_bootstrap(payload, host, port, _ROOMS.getrandbits(63))
        loop = asyncio.get_running_loop()
        prefill_task = loop.create_task(self._prefill(prefill, endpoint, payload, flight.rid))
        decode_task = loop.create_task(
            super()._attempt(
                request, endpoint, flight, payload, stream=stream, strip_usage=strip_usage
            )
        )
        try:
            done, _ = await asyncio.wait(
                {prefill_task, decode_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if prefill_task in done:
                refused = self._prefill_outcome(prefill_task, prefill, flight)
                if refused is not None and flight.ttft_s is None:
                    await _cancel(decode_task)
                    if isinstance(refused, web.Response):
                        self._end(flight, ok=False)
                        return refused
                    raise refused
            try:
                response = await decode_task
            except BaseException:
                await _cancel(prefill_task)
                raise
            if not prefill_task.done():  # the decode answered: the prefill has as good as
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait({prefill_task}, timeout=self.config.abort_timeout_s)
            if prefill_task.done() and self.pd.prefill_open(flight.rid):
                self._prefill_outcome(prefill_task, prefill, flight)
            await _cancel(prefill_task)
            return response
        except asyncio.CancelledError:
            await _cancel(decode_task)
            await _cancel(prefill_task)
            raise

    def _prefill_outcome(
        self, task: asyncio.Task[tuple[int, bytes, str]], prefill: str, flight: _Flight
    ) -> _UpstreamFailed | web.Response | None:
        """Learn from a finished prefill; what to do instead of the decode's answer, if any."""
        if task.cancelled():
            return None
        exc = task.exception()
        if isinstance(exc, _UpstreamFailed):
            return exc
        if exc is not None:
            raise exc
        status, raw, content_type = task.result()
        if status != 200:
            return web.Response(
                body=raw,
                status=status,
                headers={"Content-Type": content_type, "X-Request-Id": flight.rid},
            )
        usage = _prefill_usage(raw, content_type, flight.endpoint)
        cached = usage.cached_tokens if usage is not None else None
        self._prefill_cached[flight.rid] = cached
        self.prefill_pool.report_success(prefill)
        self.pd.on_prefill_done(flight.rid, asyncio.get_running_loop().time(), cached)
        return None

    async def _prefill(
        self, prefill: str, endpoint: Endpoint, payload: bytes, rid: str
    ) -> tuple[int, bytes, str]:
        """POST the request to the prefill server and read its (short) answer to the end."""
        headers = {"Content-Type": "application/json", "X-Request-Id": rid}
        try:
            async with self.session.post(
                prefill + endpoint.path, data=payload, headers=headers, timeout=self.timeout
            ) as resp:
                raw = await resp.read()
                if resp.status >= 500:
                    text = raw[:200].decode(errors="replace")
                    raise _UpstreamFailed(
                        f"prefill status {resp.status}: {text}",
                        trip=False,
                        status=resp.status,
                        backend=prefill,
                    )
                return resp.status, raw, resp.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _UpstreamFailed(f"prefill: {exc!r}", trip=True, backend=prefill) from None


async def _cancel(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


def _prefill_usage(raw: bytes, content_type: str, path: str) -> TokenUsage | None:
    """The prefill server's token counts: a whole body, or a stream's last counted event."""
    if "event-stream" not in content_type:
        return _body_usage(raw, "generate" if path == "/generate" else "chat")
    found: TokenUsage | None = None
    for event in _split_events(raw):
        data = _data_of(event)
        if data is not None and (b"usage" in data or b"meta_info" in data):
            usage = usage_from_sse_chunk(data)
            if usage is not None:
                found = usage
    return found
