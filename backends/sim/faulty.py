"""A fault-injecting front for one backend: forwards everything, or fails on command.

Tests and `benchmarks/faults.py` need a backend that answers 500s (or hangs before its first
byte) while its health checks still pass, which a real or simulated SGLang server does not
do on demand. `FaultyFront(target)` is a real aiohttp server on loopback that relays every
request to `target` (streams relayed chunk by chunk) until told otherwise:

- `fail_status = 500`: model requests (POST /generate, /v1/*) get that status and a JSON
  error before any byte; GETs (health, server info) still pass, as with a backend whose
  workers crash while its HTTP server lives;
- `delay_s = X`: model requests wait X seconds before they are relayed.

`failed` and `relayed` count the model requests answered each way.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

__all__ = ["FaultyFront", "start_faulty_front"]

_MODEL_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


class FaultyFront:
    def __init__(self, target: str, session: aiohttp.ClientSession) -> None:
        self.target = target.rstrip("/")
        self.session = session
        self.fail_status: int | None = None
        self.delay_s = 0.0
        self.failed = 0
        self.relayed = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        model = request.method == "POST" and request.path in _MODEL_PATHS
        if model and self.fail_status is not None:
            self.failed += 1
            err = {"error": {"message": "injected failure", "type": "server_error"}}
            return web.json_response(err, status=self.fail_status)
        if model and self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "content-type"}
        async with self.session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as upstream:
            if model:
                self.relayed += 1
            ctype = upstream.headers.get("Content-Type", "application/json")
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": ctype})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def start_faulty_front(target: str, session: aiohttp.ClientSession) -> FaultyFront:
    """A started front relaying to `target` (its `.url` is where to send traffic)."""
    front = FaultyFront(target, session)
    await front.start()
    return front
