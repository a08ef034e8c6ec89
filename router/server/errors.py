"""OpenAI-style JSON errors, and the middleware that turns every failure into one.

Every error the router answers has the shape OpenAI clients parse::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}

Handlers raise `ApiError` (status, message, type, param, code, extra headers); the
`error_middleware` renders it. aiohttp's own HTTP exceptions (unknown route 404, wrong method
405, body too large 413) are rendered the same way. Anything else is a bug: it is logged with
its traceback and the request id, and the client gets a 500 JSON naming the request id, never
the traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

__all__ = [
    "REQUEST_ID_KEY",
    "ApiError",
    "error_middleware",
    "error_response",
    "sse_error_event",
]

log = logging.getLogger("router.server")

# request[REQUEST_ID_KEY] holds the request id once the proxy assigned one
REQUEST_ID_KEY = web.RequestKey("prefix_router_rid", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error meant for the client: rendered as OpenAI-style JSON with its status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def sse_error_event(message: str, *, code: str = "upstream_error") -> bytes:
    """The event a stream ends with when its backend fails after the first byte went out."""
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render ApiError and aiohttp HTTP errors as JSON; turn bugs into a logged 500."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            message = "request body too large"
            code: str | None = "request_too_large"
        elif exc.status == 404:
            message = f"unknown path {request.path}"
            code = "not_found"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
            code = "method_not_allowed"
        else:
            message = exc.reason or "error"
            code = None
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(ApiError(exc.status, message, code=code, headers=headers))
    except Exception:
        rid = request.get(REQUEST_ID_KEY, "-")
        log.exception("unhandled error rid=%s path=%s", rid, request.path)
        return error_response(
            ApiError(
                500,
                f"internal error (request id {rid})",
                type="server_error",
                code="internal_error",
            )
        )
