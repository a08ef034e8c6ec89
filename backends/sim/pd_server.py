"""Simulated SGLang servers in PD mode: a prefill server and a decode server over HTTP.

A PD gateway (SMG's PD router, or `serve --prefill/--decode`) sends the same request, with
`bootstrap_host`, `bootstrap_port` and `bootstrap_room` added, to one prefill and one decode
server, and streams the decode server's answer. The two servers meet through the room:

    decode server    on a request, preallocates its KV (prompt + output) in first-come,
                     first-served order (`PreallocQueue`); once it holds the room, asks the
                     prefill server's bootstrap server for the request's room, and when that
                     answers hands the request to its decode engine (`decode_engine`): the
                     first token comes one step after the KV lands, then the rest.
    bootstrap server the prefill server's side door, on its bootstrap port: GET
                     /pd/kv/{room} is the decode side's handshake: it lets the prefill start
                     (SGLang's prefill server keeps a request in its bootstrap queue until
                     the decode side has preallocated), then waits until the KV would have
                     landed (200), or says the prefill failed (410) or never came (504 after
                     `room_wait_s`).
    prefill server   holds each request until its handshake, then runs the prompt with one
                     output token (engine as in pd.py), answers the gateway when that token
                     exists, and queues the prompt's KV on its link (`KVLink`, FIFO). A
                     request whose decode side never asks is aborted after `room_wait_s`.

Real SGLang moves KV with Mooncake/NIXL and meets over its own bootstrap server (ZMQ plus a
small HTTP registry); this side door plays only its timing, and only between simulated
servers. Requests without the bootstrap fields are a 400 on a decode server (it cannot
prefill) and run as plain prefill on a prefill server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web

from backends.sim import protocol as proto
from backends.sim.api import Aborted, EngineEvent, Finished, SimRequest
from backends.sim.pd import (
    KVLink,
    PreallocQueue,
    decode_engine,
    decode_request,
    prefill_engine,
)
from backends.sim.perf import get_profile
from backends.sim.server import (
    EngineFigures,
    SimServer,
    SimServerConfig,
    SimServerHandle,
    _Req,
    engine_figures,
)

__all__ = [
    "DecodeSimServer",
    "PrefillSimServer",
    "bootstrap_fields",
    "bootstrap_port_of",
    "start_pd_servers",
]

log = logging.getLogger(__name__)

_ROOM_KEEP_S = 300.0  # a ready room nobody fetched is forgotten after this


@dataclass(frozen=True, slots=True)
class Bootstrap:
    host: str
    port: int
    room: str


def bootstrap_fields(body: Mapping[str, Any]) -> Bootstrap | None:
    """The request's bootstrap fields (None if absent); BadRequest if malformed."""
    room = body.get("bootstrap_room")
    if room is None:
        return None
    host = body.get("bootstrap_host")
    port = body.get("bootstrap_port")
    if isinstance(room, bool) or not isinstance(room, int | str) or not str(room):
        raise proto.BadRequest("bootstrap_room must be an integer")
    if not isinstance(host, str) or not host:
        raise proto.BadRequest("bootstrap_host must be a non-empty string")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise proto.BadRequest("bootstrap_port must be a port number")
    return Bootstrap(host=host, port=port, room=str(room))


class PrefillSimServer(SimServer):
    """Prefill-only: one output token, then the KV goes over the link (module docstring)."""

    def __init__(
        self,
        engine: Any,
        figures: EngineFigures,
        config: SimServerConfig | None = None,
        *,
        link: KVLink,
        bootstrap_port: int = 0,
        room_wait_s: float = 60.0,
    ) -> None:
        super().__init__(engine, figures, config)
        self.link = link
        self.bootstrap_port = bootstrap_port
        self.room_wait_s = room_wait_s
        self._room_of: dict[str, str] = {}  # rid -> room
        # room -> ready wall time (loop clock), or None: its prefill failed
        self._rooms: dict[str, asyncio.Future[float | None]] = {}
        self._room_born: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        # room -> its request, waiting for the decode side's handshake (bootstrap queue)
        self._bootstrapping: dict[str, tuple[_Req, SimRequest]] = {}
        self._shaken: set[str] = set()  # rooms whose handshake came before their request

    def _room(self, room: str) -> asyncio.Future[float | None]:
        fut = self._rooms.get(room)
        if fut is None:
            fut = self._rooms[room] = asyncio.get_running_loop().create_future()
            self._room_born[room] = time.monotonic()
            self._prune()
        return fut

    def _prune(self) -> None:
        cutoff = time.monotonic() - _ROOM_KEEP_S
        for room, born in list(self._room_born.items()):
            if born >= cutoff:
                break  # insertion order: the rest are younger
            del self._room_born[room]
            self._shaken.discard(room)
            fut = self._rooms.pop(room, None)
            if fut is not None and not fut.done():
                fut.cancel()

    def _enter(self, req: _Req, sim: SimRequest, now: float, body: Mapping[str, Any]) -> None:
        boot = bootstrap_fields(body)
        req.output_tokens = 1  # a prefill server computes the prompt and the first token
        sim = replace(sim, output_tokens=1)
        if boot is not None:
            self._room_of[req.rid] = boot.room
            self._room(boot.room)
            if boot.room not in self._shaken:  # the bootstrap queue, until the handshake
                self._bootstrapping[boot.room] = (req, sim)
                asyncio.get_running_loop().call_later(self.room_wait_s, self._expire, boot.room)
                return
            self._shaken.discard(boot.room)
        self.engine.add_request(sim, now)

    def _handshake(self, room: str) -> None:
        """The decode side holds the room's KV: its prefill may start."""
        waiting = self._bootstrapping.pop(room, None)
        if waiting is None:
            self._shaken.add(room)  # its request has not come yet
            return
        req, sim = waiting
        if req.state != "running":
            return
        now = self._now()
        self._advance(now)
        self.engine.add_request(sim, now)
        self._wake.set()

    def _expire(self, room: str) -> None:
        """No decode side asked for this room in time: abort its request, as SGLang's
        bootstrap timeout does."""
        waiting = self._bootstrapping.pop(room, None)
        if waiting is not None and waiting[0].state == "running":
            self._end_aborted(waiting[0])

    def _on_event(self, ev: EngineEvent) -> None:
        room = self._room_of.pop(ev.rid, None) if isinstance(ev, Finished | Aborted) else None
        if room is not None:
            fut = self._room(room)
            if not fut.done():
                if isinstance(ev, Finished):
                    landed = self.link.send(ev.prompt_tokens, ev.time)
                    fut.set_result(self._wall(landed))
                else:
                    fut.set_result(None)
        super()._on_event(ev)

    def _end_aborted(self, req: _Req) -> None:
        room = self._room_of.pop(req.rid, None)
        if room is not None:
            self._bootstrapping.pop(room, None)
            fut = self._room(room)
            if not fut.done():
                fut.set_result(None)
        super()._end_aborted(req)

    async def _h_kv(self, request: web.Request) -> web.Response:
        room = request.match_info["room"]
        self._handshake(room)
        fut = self._room(room)
        try:
            ready = await asyncio.wait_for(asyncio.shield(fut), self.room_wait_s)
        except TimeoutError:
            self._shaken.discard(room)  # its request never came: forget the handshake
            return web.json_response({"error": f"room {room} never prefilled"}, status=504)
        except asyncio.CancelledError:
            if fut.cancelled():
                return web.json_response({"error": f"room {room} expired"}, status=410)
            raise
        if ready is None:
            self._forget(room)
            return web.json_response({"error": f"room {room}: prefill failed"}, status=410)
        await asyncio.sleep(max(0.0, ready - self._loop_time()))
        self._forget(room)
        return web.json_response({"room": room})

    def _forget(self, room: str) -> None:
        self._rooms.pop(room, None)
        self._room_born.pop(room, None)

    async def on_start(self, host: str) -> None:
        app = web.Application()
        app.router.add_get("/pd/kv/{room}", self._h_kv)
        app.router.add_get("/health", _ok)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, self.bootstrap_port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                self.bootstrap_port = int(addr[1])
                break
        self._runner = runner

    async def on_close(self) -> None:
        for fut in self._rooms.values():
            if not fut.done():
                fut.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class DecodeSimServer(SimServer):
    """Decode-only: waits for the request's KV from its prefill server, then decodes."""

    def __init__(
        self, engine: Any, figures: EngineFigures, config: SimServerConfig | None = None
    ) -> None:
        super().__init__(engine, figures, config)
        self._waits: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._prealloc = PreallocQueue(engine)
        self._room_held: dict[str, asyncio.Future[None]] = {}  # rid -> set once preallocated

    def _enter(self, req: _Req, sim: SimRequest, now: float, body: Mapping[str, Any]) -> None:
        boot = bootstrap_fields(body)
        if boot is None:
            raise proto.BadRequest(
                "a decode server needs bootstrap_host, bootstrap_port and bootstrap_room "
                "(send the request through a PD router)"
            )
        if not self._prealloc.offer(req.rid, sim.prompt_tokens, sim.output_tokens):
            # (the server's own check refuses these before they get here)
            raise proto.BadRequest(
                f"prompt ({sim.prompt_tokens} tokens) plus max_tokens ({sim.output_tokens}) "
                f"exceed this decode server's KV pool ({self.engine.load().kv_capacity_tokens})"
            )
        loop = asyncio.get_running_loop()
        self._room_held[req.rid] = loop.create_future()
        self._waits[req.rid] = loop.create_task(self._await_kv(req, sim, boot))
        self._pump(now)

    def _advance(self, now: float) -> None:
        super()._advance(now)
        if self._room_held:
            self._pump(now)

    def _pump(self, now: float) -> None:
        """Preallocate for the queue's head while it fits; those requests may handshake."""
        for rid in self._prealloc.pump(now):
            held = self._room_held.pop(rid, None)
            if held is not None and not held.done():
                held.set_result(None)

    async def _await_kv(self, req: _Req, sim: SimRequest, boot: Bootstrap) -> None:
        held = self._room_held.get(req.rid)
        if held is not None:
            await held  # KV room first: only then may the prefill start
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
            url = f"http://{boot.host}:{boot.port}/pd/kv/{boot.room}"
            async with self._session.get(url) as resp:
                ok = resp.status == 200
                if not ok:
                    log.debug("room %s: bootstrap answered %d", boot.room, resp.status)
        except aiohttp.ClientError as exc:
            log.debug("room %s: bootstrap unreachable (%s)", boot.room, exc)
            ok = False
        finally:
            self._waits.pop(req.rid, None)
        if req.state != "running":
            self._prealloc.cancel(req.rid)
            return
        if not ok:
            self._prealloc.cancel(req.rid)
            self._end_aborted(req)
            return
        now = self._now()
        self._advance(now)
        self.engine.add_request(decode_request(req.rid, sim.prompt_tokens, sim.output_tokens), now)
        self._wake.set()

    def _abort(self, req: _Req) -> None:
        task = self._waits.pop(req.rid, None)
        if task is not None:
            task.cancel()
            self._room_held.pop(req.rid, None)
            self._prealloc.cancel(req.rid)  # queued or preallocated: its room goes back
            if req.state == "running":
                self._end_aborted(req)
            self._pump(self._now())
            return
        super()._abort(req)

    async def _h_health_generate(self, request: web.Request) -> web.Response:
        """A decode server cannot run a request alone (no prefill): alive is healthy."""
        return web.Response(status=200 if self._driver is not None else 503)

    async def on_close(self) -> None:
        for task in list(self._waits.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


async def start_pd_servers(
    mode: str,
    count: int,
    *,
    host: str = "127.0.0.1",
    base_port: int = 0,
    bootstrap_base_port: int = 0,
    profile: str = "llama3-8b-h100",
    config: SimServerConfig | None = None,
    engine_config: Mapping[str, Any] | None = None,
    link_bytes_per_s: float | None = None,
) -> list[SimServerHandle]:
    """Start `count` prefill or decode servers (`mode`); bootstrap ports follow the base."""
    from backends.sim.engine import EngineConfig

    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', not {mode!r}")
    cfg = config or SimServerConfig()
    prof = get_profile(profile)
    ecfg = EngineConfig(**{"page_size": cfg.page_size, **(engine_config or {})})
    figures = engine_figures(profile, prof, ecfg)
    handles: list[SimServerHandle] = []
    try:
        for i in range(count):
            server: SimServer
            if mode == "prefill":
                link = KVLink(
                    link_bytes_per_s or prof.kv_link_bytes_per_s, prof.kv_bytes_per_token()
                )
                server = PrefillSimServer(
                    prefill_engine(prof, ecfg),
                    figures,
                    cfg,
                    link=link,
                    bootstrap_port=0 if bootstrap_base_port == 0 else bootstrap_base_port + i,
                )
            else:
                server = DecodeSimServer(decode_engine(prof, ecfg), figures, cfg)
            port = 0 if base_port == 0 else base_port + i
            handles.append(await SimServerHandle.start(server, host, port))
    except BaseException:
        for h in handles:
            await h.close()
        raise
    return handles


def bootstrap_port_of(handle: SimServerHandle) -> int | None:
    """The bootstrap port of a prefill server's handle (None for any other server)."""
    server = handle.server
    return server.bootstrap_port if isinstance(server, PrefillSimServer) else None
