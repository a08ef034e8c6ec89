"""The model endpoints skip aiohttp's application router and its middleware chain.

aiohttp hands every request to `Application._handle`: resolve the path against the route table
(a yarl path, a walk over resources, a match-info object frozen per request), look for
`Expect`, fetch the middleware chain, run `_fix_request_current_app`, then `error_middleware`
and the `_late` wrapper that finds the handler in the app's state; `prepare()` then runs the
app's response signals through the match info. For the three POST model endpoints, which
carry nearly all of a router's traffic, the answer to all of that is fixed once the app has
started. `HotRoutes` looks up (method, raw request target) in a dict of bound handlers and
runs the handler under the same `error_middleware` (same JSON errors, same 413 for a large
body, same logged 500). Anything else -- another path, a query string, percent-escapes, an
absolute-form target, an `Expect` header -- goes through the application as before, so what
aiohttp would have answered for it is unchanged. The model handlers never read
`request.match_info` or `request.app`, which stay unset on this path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import cast

from aiohttp import hdrs, web
from aiohttp.web_request import BaseRequest

from router.server.errors import error_middleware

__all__ = ["HotRoutes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HotRoutes:
    """The server's request handler: exact (method, raw path) first, the app for the rest."""

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        app_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> None:
        self.routes = dict(routes)
        self.app_handler = app_handler

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        handler = self.routes.get((request.method, request.raw_path))
        if handler is None or hdrs.EXPECT in request.headers:
            return await self.app_handler(request)
        # the app's request factory made a web.Request (no isinstance per request)
        return await error_middleware(cast(web.Request, request), handler)
