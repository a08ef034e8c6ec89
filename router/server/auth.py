"""Bearer-token checks: client API keys for the model endpoints, one admin key for /admin/.

Two key sets, kept apart on purpose: a leaked client key must not let anyone reshape the pool.

- Client endpoints (/v1/*, /generate): with no `--api-key` configured they are open; with keys
  configured, a request needs `Authorization: Bearer <one of them>` (or `x-api-key`), else 401.
- Status endpoints (/stats, /metrics: backend URLs, last errors, learned speeds): open by
  default; with `--protect-status` they need a client key or the admin key (401 otherwise).
  /health and /readiness stay open for load-balancer probes.
- Admin endpoints (/admin/*): closed when no admin key is configured (403: the API is off);
  a request without a token or with an unknown one gets 401; a valid *client* key gets 403
  (authenticated, not allowed).

Comparisons are constant-time (`hmac.compare_digest`) over every configured key.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web

from router.server.errors import ApiError

__all__ = ["bearer_token", "check_admin", "check_client", "check_status"]


def bearer_token(request: web.Request) -> str | None:
    """The token from `Authorization: Bearer ...`, or from `x-api-key`."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    alt = request.headers.get("x-api-key", "").strip()
    return alt or None


def _matches(token: str, keys: Sequence[str]) -> bool:
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: encode them back, not fail
    raw = token.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(raw, key.encode())
    return found


def check_client(request: web.Request, api_keys: Sequence[str]) -> None:
    """Raise 401 unless client keys are off or the request carries one of them."""
    if not api_keys:
        return
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches(token, api_keys):
        raise ApiError(
            401,
            "incorrect API key provided",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def check_admin(request: web.Request, admin_key: str | None, api_keys: Sequence[str]) -> None:
    """Raise 401 without a valid admin key, 403 for a client key or when admin is off."""
    token = bearer_token(request)
    if admin_key is None:
        raise ApiError(
            403, "the admin API is disabled (start with --admin-key)", code="admin_disabled"
        )
    if token is None:
        raise ApiError(
            401,
            "missing admin key",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if _matches(token, [admin_key]):
        return
    if _matches(token, api_keys):
        raise ApiError(403, "this key may not use the admin API", code="insufficient_permissions")
    raise ApiError(
        401, "incorrect admin key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def check_status(request: web.Request, api_keys: Sequence[str], admin_key: str | None) -> None:
    """Raise 401 unless the request carries a client key or the admin key."""
    token = bearer_token(request)
    keys = [*api_keys, *([admin_key] if admin_key else [])]
    if token is None or not _matches(token, keys):
        raise ApiError(
            401,
            "status endpoints need an API key (--protect-status)",
            code="missing_api_key" if token is None else "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
