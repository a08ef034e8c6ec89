"""The admin API under /admin/: list, add, remove and drain backends at run time.

Every call needs `Authorization: Bearer <admin key>` (see `auth.check_admin`: 401 without it,
403 with a client key). Bodies and answers are JSON::

    GET    /admin/backends                          -> {"backends": [<backend>, ...]}
    POST   /admin/backends         {"url": URL, "profile": NAME?} -> 201 {"backend": <backend>}
    DELETE /admin/backends         {"url": URL}     -> 200 {"removed": URL}      (404 if unknown)
    POST   /admin/backends/drain   {"url": URL, "drain": true|false} -> {"backend": <backend>}

An added backend is discovered and health-checked at once; it takes traffic once healthy.
`profile` names the backend's performance profile (its routing prior; default: `--profile`).
A removed backend's in-flight requests run to their end; a drained one gets nothing new.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from router.server.auth import check_admin
from router.server.config import ServerConfig
from router.server.errors import ApiError
from router.server.jsonbody import read_object
from router.server.pool import BackendPool, PoolEntry

__all__ = ["AdminApi", "describe_entry"]


def describe_entry(entry: PoolEntry) -> dict[str, Any]:
    info = entry.info
    return {
        "url": entry.url,
        "healthy": entry.healthy,
        "draining": entry.draining,
        "discovered": info is not None,
        "circuit": entry.breaker.state.value,
        "consecutive_failures": entry.breaker.failures,
        "last_error": entry.last_error,
        "models": list(info.models) if info else [],
        "kv_capacity_tokens": info.kv_capacity_tokens if info else None,
        "host_cache_tokens": info.host_cache_tokens if info else None,
        "page_size": info.page_size if info else None,
        "profile": info.profile if info else entry.profile,
    }


class AdminApi:
    def __init__(self, config: ServerConfig, pool: BackendPool) -> None:
        self.config = config
        self.pool = pool

    def _guard(self, request: web.Request) -> None:
        check_admin(request, self.config.admin_key, self.config.api_keys)

    async def _url(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        _, body = await read_object(request)
        url = body.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ApiError(400, "url must be a non-empty string", param="url")
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        return url, body

    async def list(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        return web.json_response(
            {"backends": [describe_entry(e) for e in self.pool.entries.values()]}
        )

    async def add(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        url, body = await self._url(request)
        profile = body.get("profile")
        if profile is not None and not isinstance(profile, str):
            raise ApiError(400, "profile must be a string", param="profile")
        try:
            entry = self.pool.add(url, profile=profile)
        except KeyError as exc:
            raise ApiError(400, str(exc.args[0]), param="profile", code="unknown_profile") from None
        await self.pool.check(entry, asyncio.get_running_loop().time())
        return web.json_response({"backend": describe_entry(entry)}, status=201)

    async def remove(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        url, _ = await self._url(request)
        if not self.pool.remove(url):
            raise ApiError(404, f"no backend {url}", param="url", code="backend_not_found")
        return web.json_response({"removed": url})

    async def drain(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        url, body = await self._url(request)
        drain = body.get("drain", True)
        if not isinstance(drain, bool):
            raise ApiError(400, "drain must be a boolean", param="drain")
        if not self.pool.drain(url, drain):
            raise ApiError(404, f"no backend {url}", param="url", code="backend_not_found")
        entry = self.pool.get(url)
        assert entry is not None
        return web.json_response({"backend": describe_entry(entry)})
