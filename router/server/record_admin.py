"""Turning the recorder on and off: `serve --record PATH` and the admin API.

    GET    /admin/record                  -> {"recording": bool, ...the recorder's counters}
    POST   /admin/record  {"path": PATH}  -> 201 {"recording": true, ...}   (409 if already on)
    DELETE /admin/record                  -> {"recording": false, ...the final counters}

Every call needs the admin key (`auth.check_admin`). Starting builds the tokenizer and block
hasher if the policy did not need them (a moment, on the admin call, not on a request): the
recording needs every request's blocks, whatever the policy reads. Stopping writes what is
queued (briefly) and closes the file. The app's shutdown stops a running recording the same way.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from router.core.blocks import BlockHasher
from router.core.tokens import load_tokenizer
from router.server.auth import check_admin
from router.server.config import ServerConfig
from router.server.errors import ApiError
from router.server.proxy import Proxy
from router.server.recorder import Recorder, RecorderConfig, record_path, secret_key

__all__ = ["RecordControl"]


class RecordControl:
    """Owns the proxy's recorder: start, stop, status; one recording at a time per process."""

    def __init__(
        self, config: ServerConfig, proxy: Proxy, *, policy_name: str, replica: str
    ) -> None:
        self.config = config
        self.proxy = proxy
        self.policy_name = policy_name
        self.replica = replica
        self.last: dict[str, Any] | None = None  # the counters of the last stopped recording

    def start(self, template: str) -> Recorder:
        """Begin recording to `template` (with `{pid}` / `{replica}` filled in)."""
        if self.proxy.recorder is not None:
            raise ApiError(409, "already recording", code="already_recording")
        path = record_path(template, self.replica)
        if not path.parent.is_dir():
            raise ApiError(400, f"no folder {path.parent}", param="path", code="bad_path")
        config = self.config
        if self.proxy.hasher is None:
            tokenizer = load_tokenizer(config.tokenizer)
            self.proxy.hasher = BlockHasher(tokenizer, block_tokens=config.block_tokens)
        recorder = Recorder(
            RecorderConfig(
                path=path,
                key=secret_key(config.record_secret),
                policy=self.policy_name,
                max_bytes=config.record_max_bytes,
                keep=config.record_keep,
                time_scale=config.speedup if config.embedded else 1.0,
            ),
            clock_start=asyncio.get_running_loop().time(),
            pool_size=lambda: len(self.proxy.pool.entries),
        )
        self.proxy.recorder = recorder
        return recorder

    async def stop(self) -> dict[str, Any] | None:
        """Stop recording (queued records written first); the final counters, or None."""
        recorder = self.proxy.recorder
        if recorder is None:
            return None
        self.proxy.recorder = None
        await asyncio.get_running_loop().run_in_executor(None, recorder.close)
        self.last = recorder.status()
        return self.last

    def _status(self) -> dict[str, Any]:
        recorder = self.proxy.recorder
        if recorder is None:
            return {"recording": False, "last": self.last}
        return {"recording": True, **recorder.status()}

    # ----- handlers ----------------------------------------------------------------------

    def _guard(self, request: web.Request) -> None:
        check_admin(request, self.config.admin_key, self.config.api_keys)

    async def get(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        return web.json_response(self._status())

    async def post(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        try:
            body = json.loads(await request.read() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path.strip():
            raise ApiError(400, "path must be a non-empty string", param="path")
        self.start(str(Path(path.strip())))
        return web.json_response(self._status(), status=201)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        if self.proxy.recorder is None:
            raise ApiError(409, "not recording", code="not_recording")
        final = await self.stop()
        return web.json_response({"recording": False, "last": final})
