"""JSON errors for requests that never reach a handler: what aiohttp's HTTP parser refuses.

A request line or header past the parser's limits (`max_line_size`, `max_field_size`, 8190
bytes each by default; `--max-header-bytes` here), a malformed request line or header, or a
bad chunked encoding is answered by aiohttp's `RequestHandler.handle_error` before any
middleware runs: a plain-text 400 and a logged traceback. `JsonErrorHandler` overrides that
one method so the client gets the same OpenAI-style JSON error as everywhere else, and the log
gets one line without a traceback (a client's malformed request is not the router's bug).

aiohttp builds its `RequestHandler` inside `web.Server.__call__`; `JsonErrorRunner` is an
`AppRunner` whose server builds ours instead (same arguments).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from router.server.errors import ApiError, error_response
from router.server.fastpath import Handler, HotRoutes

__all__ = ["JsonErrorHandler", "JsonErrorRunner", "JsonErrorServer"]

log = logging.getLogger("router.server")


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with parser errors rendered as JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # same contract as aiohttp's: the reply began
            raise ConnectionError("response already started, cannot send the error")
        reason = str(exc) if exc is not None else (message or "")
        if status >= 500:
            log.error("unhandled server error (%s): %s", status, reason[:200])
            err = ApiError(status, "internal error", type="server_error", code="internal_error")
        else:
            log.info("bad request from %s: %s", request.remote, reason[:200])
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            err = ApiError(status, f"{phrase or 'bad request'}: {reason[:200]}", code="bad_request")
        resp = error_response(err)
        resp.force_close()
        return resp


class JsonErrorServer(web.Server):
    """A `web.Server` whose connections are `JsonErrorHandler`s."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An `AppRunner` serving through `JsonErrorServer`; `hot` (called once the app has
    started) names the routes that skip the app's router (router/server/fastpath.py)."""

    def __init__(
        self,
        app: web.Application,
        *,
        hot: Callable[[], Mapping[tuple[str, str], Handler]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._hot = hot

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app has started: its state exists
        kwargs: dict[str, Any] = dict(plain._kwargs)
        handler = plain.request_handler
        if self._hot is not None:
            handler = HotRoutes(self._hot(), handler)
        return JsonErrorServer(
            handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **kwargs,
        )
