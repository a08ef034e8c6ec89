"""SGLang's own endpoints that clients call on what they believe is an SGLang server.

`sglang.RuntimeEndpoint` (SGLang's frontend language) asks `/get_model_info` when it is built;
the router answers with a healthy backend's own answer, so SGLang's clients drive the router
unchanged. Bodies are relayed as the backend sent them (they carry no prompt text).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from router.server.errors import ApiError
from router.server.pool import BackendPool

__all__ = ["ModelInfoRelay"]


class ModelInfoRelay:
    """GET `/get_model_info` (and `/model_info`) from the first healthy backend."""

    def __init__(self, pool: BackendPool, session: aiohttp.ClientSession, timeout_s: float):
        self.pool = pool
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def model_info(self, request: web.Request) -> web.StreamResponse:
        for entry in self.pool.entries.values():
            if not entry.healthy or entry.draining:
                continue
            for path in ("/get_model_info", "/model_info"):
                try:
                    async with self.session.get(entry.url + path, timeout=self.timeout) as resp:
                        if resp.status != 200:
                            continue
                        return web.Response(body=await resp.read(), content_type="application/json")
                except (TimeoutError, aiohttp.ClientError):
                    break
        raise ApiError(503, "no healthy backend answered model info", code="no_healthy_backend")
