"""Forwarding: parse, route, send upstream, stream back, feed the routing core.

One request's path through `Proxy.forward`::

    read body (413 over the limit) -> JSON object (400) -> parse prompt (400) -> model known (404)
    -> [tokenize into blocks, only when the policy needs them]
    -> attempt 1..max_attempts:
         core.route(exclude=failed backends)            (none left -> 503 + Retry-After)
         POST upstream with our rid in the body
           refused / reset / 5xx before any byte went to the client
                -> core.on_failed, breaker, exclude it, try the next backend
    -> headers arrived: pass status + content-type through, prepare(), write() the SSE events
       first event: core.on_first_token(cached)    end: core.on_finished(output, cached)
       upstream breaks after the first byte: `data: {"error": ...}` then stop (never retried)
       client goes away (cancellation / reset): abort upstream + POST /abort_request {rid}

Every request ends in exactly one of on_finished / on_failed, recorded in a `finally`.

Other router replicas hear of each of these moments through `StateSync` (docs/replicas.md):
`sync.routed` right after `core.route`, `sync.first_token` beside `core.on_first_token` and
`sync.ended` beside the ending, each with the core's record (taken before the ending forgets
it). The sync only appends to an outbox, and with the default memory state returns at once.

Feedback timing: a stream's first data event is its first token (TTFT = that moment minus
routing). `/generate` chunks carry `meta_info.cached_tokens` from the first one on, so the core
hears cached tokens at first token; OpenAI streams report usage only at the end, so their
cached tokens reach the core with `on_finished`. A non-streaming response has no first-token
moment: it goes straight to `on_finished` (its latency would be a false TTFT).

Streams are relayed as they arrive: each upstream read's complete SSE events go out in one
write (an incomplete tail waits for the next read), so nothing is buffered longer than an
event. The model requests go through the proxy's own HTTP/1.1 client
(router/server/upstream.py), whose read callback hands each read to the stream's sink
(router/server/sse.py), which writes to the client's transport at once (whole chunks still
framed, as they came, when nothing in them needs parsing): this coroutine wakes only for the
first event, a drain and the end. Only what feedback needs is parsed: the first data event, an
OpenAI event holding a `usage` object and a /generate stream's last event. For OpenAI streams
the router asks the backend for `stream_options.include_usage` (to learn cached tokens) and
drops that extra usage chunk when the client did not ask for it. Prompt text is logged only
with `--log-prompts`.

Tokenizing and hashing a big prompt (over `executor_tokenize_chars` of body) runs on the
proxy's own single-thread executor: `BlockHasher` and its token cache mutate LRU dicts, so
two threads at once could race (an eviction between a lookup and its move_to_end), and one
thread keeps them serial. tiktoken releases the GIL while it encodes, so the event loop keeps
serving streams meanwhile; smaller prompts are hashed inline (a thread hop costs more than
they do). Measured on the multi-turn window (27k characters median): inline 1.4 ms median
per request, executor 1.8-2.2 ms, with the loop's p99 stall 3.6 ms inline vs 1.5-2.7 ms.
`close()` shuts the executor down (the app's lifecycle calls it at exit).

Per-request CPU is the router's overhead, so the hot path avoids work it does not need: the
client's body goes upstream as its own bytes with `rid` (and `stream_options`) spliced in,
JSON is read with orjson, a whole response's counts are read from its tail `usage` /
`meta_info` object only, request ids come from a counter, and the access line is built only
when INFO logging is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from backends.sglang import TokenUsage, abort_request, usage_from_sse_chunk
from router.core.blocks import BlockHasher
from router.core.model import Policy, RouteRequest
from router.core.prompt import Prompt, PromptError, parse_chat, parse_completion, parse_generate
from router.core.routing import Decision, NoBackendError, RoutingCore
from router.server.auth import check_client
from router.server.config import ServerConfig
from router.server.errors import REQUEST_ID_KEY, ApiError, sse_error_event
from router.server.explain import HEADER as REASON_HEADER
from router.server.explain import route_reason
from router.server.heads import StreamedResponse, answer, streamed
from router.server.jsonbody import loads as _loads
from router.server.jsonbody import read_object, too_deep
from router.server.metrics import RouterMetrics
from router.server.pool import BackendPool
from router.server.recorder import Recorder
from router.server.scheduling import SchedulerDriver, ticket_for
from router.server.sse import ClientGone as _ClientGone
from router.server.sse import SseRelay, data_of, has_done, last_data, usage_at
from router.server.upstream import Target, Upstream, UpstreamError, UpstreamResponse
from router.state import StateSync

__all__ = ["Endpoint", "Proxy"]

log = logging.getLogger("router.server.proxy")

EndpointKind = Literal["chat", "completion", "generate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    kind: EndpointKind
    path: str  # upstream path, same as ours


ENDPOINTS: dict[EndpointKind, Endpoint] = {
    "chat": Endpoint(kind="chat", path="/v1/chat/completions"),
    "completion": Endpoint(kind="completion", path="/v1/completions"),
    "generate": Endpoint(kind="generate", path="/generate"),
}

PARSERS: dict[EndpointKind, Callable[[Mapping[str, Any]], Prompt]] = {
    "chat": parse_chat,
    "completion": parse_completion,
    "generate": parse_generate,
}


class _UpstreamFailed(Exception):
    """The backend failed before any byte reached the client: the request may be re-routed."""

    def __init__(
        self, reason: str, *, trip: bool, status: int | None = None, backend: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.trip = trip
        self.status = status
        self.backend = backend  # who failed, when not the attempt's backend (PD: the prefill)


async def _to_client(
    request: web.Request, response: web.StreamResponse, data: bytes
) -> AbstractStreamWriter:
    """Send `data` to the client, so that its failures cannot pass for the backend's.

    A write to a client that hung up raises `aiohttp.ClientConnectionResetError`, which is
    also an `aiohttp.ClientConnectionError`: caught with the upstream's read errors, one
    disconnecting client would count as a failure of its backend and a storm of them opened
    every backend's breaker (benchmarks/faults.py, disconnect_storm).
    """
    try:
        writer = await response.prepare(request)
        assert writer is not None
        if data:
            await response.write(data)  # a StreamedResponse's head goes out with it
        elif isinstance(response, StreamedResponse):
            response.send_head()
        elif hasattr(writer, "send_headers"):  # aiohttp >= 3.11 holds headers for the body
            writer.send_headers()
        return writer
    except ConnectionError as exc:
        raise _ClientGone() from exc


@dataclass(slots=True)
class _Flight:
    """What one request did, for its single log line and its single ending."""

    rid: str
    endpoint: str
    started: float
    backend: str | None = None
    predicted_cached: int = 0
    predicted_ttft_s: float | None = None
    routed_at: float = 0.0
    reason: str | None = None  # x-route-reason (serve --explain)
    status: int = 0
    ttft_s: float | None = None
    usage: TokenUsage | None = None
    attempts: int = 0
    ended: bool = False
    route: RouteRequest | None = None  # what was routed (the recorder's blocks and sizes)
    model: str | None = None
    # the request's loop's clock (`loop.time`), looked up once: `asyncio.get_running_loop()`
    # costs a getpid syscall on CPython 3.11, and a stream took five of them
    clock: Callable[[], float] = time.monotonic


class Proxy:
    """The request handlers for the model endpoints, sharing one session and one core."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        core: RoutingCore,
        policy: Policy,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        metrics: RouterMetrics,
        hasher: BlockHasher | None,
        sync: StateSync,
    ) -> None:
        self.config = config
        self.sync = sync
        # fixed per transport; read once so a lone router's hot path pays one attribute test
        self._sharing = sync.enabled
        self.core = core
        self.policy = policy
        self.pool = pool
        self.session = session
        self.metrics = metrics
        self.hasher = hasher
        self.recorder: Recorder | None = None  # `--record` / POST /admin/record
        # one thread: the hasher's caches are not thread-safe (see the module docstring)
        self._hash_executor: ThreadPoolExecutor | None = None
        self.live: set[str] = set()
        # request ids: a random per-process prefix and a serial (a uuid4 each costs more)
        self._rid_prefix = uuid.uuid4().hex[:16]
        self._rid_serial = itertools.count(1)
        self._targets: dict[tuple[str, str], Target] = {}
        self.timeout = aiohttp.ClientTimeout(  # the PD prefill side's aiohttp requests
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        )
        # the model requests' own HTTP client: streams relayed from its read callback
        self.upstream = Upstream(
            connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s
        )
        self.background: set[asyncio.Task[None]] = set()
        # --scheduler on: requests wait in the router until bound (router/server/scheduling.py)
        self.scheduling: SchedulerDriver | None = None

    # ----- entry points -----------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, ENDPOINTS["chat"])

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, ENDPOINTS["completion"])

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, ENDPOINTS["generate"])

    async def models(self, request: web.Request) -> web.StreamResponse:
        check_client(request, self.config.api_keys)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "prefix-router"}
            for name in self.pool.models()
        ]
        return web.json_response({"object": "list", "data": data})

    # ----- the request's life -----------------------------------------------------------

    def _new_rid(self, request: web.Request, body: Mapping[str, Any] | None) -> str:
        given = request.headers.get("X-Request-Id", "").strip()
        if body is not None and isinstance(body.get("rid"), str):
            given = given or str(body["rid"])
        # a client's id goes into response and upstream headers: printable ASCII only (no CR/LF
        # injection, no bytes aiohttp cannot encode), anything else replaced by "_"
        given = _RID_UNSAFE.sub("_", given[:128]) if given else given
        rid = given if given else f"{self._rid_prefix}{next(self._rid_serial):x}"
        if rid in self.live:
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        return rid

    async def _route_request(
        self, prompt: Prompt, rid: str, body_chars: int, stream: bool
    ) -> RouteRequest:
        """Blocks only when the policy reads them; big prompts tokenize off the event loop.

        A non-streamed answer shows no first token (`first_token_seen=False`)."""
        if self.hasher is None or not (self.policy.needs_blocks or self.recorder is not None):
            return RouteRequest(
                rid=rid,
                blocks=(),
                block_tokens=self.config.block_tokens,
                prompt_tokens=0,
                max_tokens=prompt.max_tokens,
                session_key=prompt.session_key,
                first_token_seen=stream,
            )
        if body_chars > self.config.executor_tokenize_chars:
            executor = self._hash_executor
            if executor is None:
                executor = self._hash_executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="router-hash"
                )
            loop = asyncio.get_running_loop()
            hash_it = partial(self.hasher.route_request, first_token_seen=stream)
            return await loop.run_in_executor(executor, hash_it, prompt, rid)
        return self.hasher.route_request(prompt, rid, first_token_seen=stream)

    def close(self) -> None:
        """Stop the hashing thread (after the requests that use it have ended); close idle
        upstream connections."""
        self.upstream.close()
        if self._hash_executor is not None:
            self._hash_executor.shutdown(wait=True, cancel_futures=True)
            self._hash_executor = None

    def _exclusions(self, body: Mapping[str, Any], endpoint: Endpoint) -> set[str]:
        """Backends that cannot serve the requested model (404 when none can)."""
        if endpoint.kind == "generate":
            return set()
        model = body.get("model")
        if not isinstance(model, str):
            return set()
        unfit = self.pool.unfit(model)
        if unfit is None:
            raise ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return unfit

    async def forward(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        flight = _Flight(rid="-", endpoint=endpoint.path, started=loop.time(), clock=loop.time)
        self.metrics.in_flight.inc(amount=1)
        try:
            response = await self._forward(request, endpoint, flight)
            flight.status = response.status
            return response
        except ApiError as err:
            flight.status = err.status
            if err.status == 503:
                self.metrics.errors.inc("no_backend")
            raise
        except asyncio.CancelledError:
            flight.status = 499  # client closed the request
            self.metrics.errors.inc("client_disconnect")
            raise
        except Exception:
            flight.status = 500
            self.metrics.errors.inc("internal")
            if REQUEST_ID_KEY not in request:  # failed before the body named one
                request[REQUEST_ID_KEY] = self._new_rid(request, None)
            raise
        finally:
            self.metrics.in_flight.inc(amount=-1)
            self.metrics.requests.inc(endpoint.path, str(flight.status))
            self._end(flight, ok=False)  # no-op when the request already ended
            self.live.discard(flight.rid)
            if self.recorder is not None and flight.route is not None:
                self.recorder.offer(flight)  # a put_nowait: written off the request path
            if log.isEnabledFor(logging.INFO):
                self._log_flight(flight, endpoint, loop.time())

    def _log_flight(self, flight: _Flight, endpoint: Endpoint, now: float) -> None:
        """The request's one access-log line (built only when INFO is on: it costs)."""
        ttft = f"{flight.ttft_s * 1000:.1f}ms" if flight.ttft_s is not None else "-"
        cached = flight.usage.cached_tokens if flight.usage else None
        log.info(
            "rid=%s endpoint=%s backend=%s status=%s ttft=%s cached=%s predicted=%d attempts=%d "
            "e2e=%.1fms",
            flight.rid,
            endpoint.path,
            flight.backend or "-",
            flight.status,
            ttft,
            cached if cached is not None else "-",
            flight.predicted_cached,
            flight.attempts,
            (now - flight.started) * 1000,
        )

    async def _forward(
        self, request: web.Request, endpoint: Endpoint, flight: _Flight
    ) -> web.StreamResponse:
        check_client(request, self.config.api_keys)
        raw, body = await read_object(request, self.config.max_body_bytes)
        rid = self._new_rid(request, body)
        request[REQUEST_ID_KEY] = rid
        flight.rid = rid
        try:
            prompt = PARSERS[endpoint.kind](body)
        except PromptError as exc:
            raise ApiError(400, str(exc), code="invalid_request") from None
        if endpoint.kind == "generate" and _batch_size(body) > 1:
            raise ApiError(
                400,
                "batched /generate (a list of several prompts) is not supported: send one "
                "prompt per request, so each is routed to the backend caching its prefix",
                param="text" if "text" in body else "input_ids",
                code="batch_not_supported",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise ApiError(400, "stream must be a boolean", param="stream", code="invalid_type")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string", param="model", code="invalid_type")
        stream = stream is True
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):  # the backend's 400 is not
            raise ApiError(  # OpenAI-shaped, and a stream would splice into it (fuzz.py)
                400,
                "stream_options must be an object",
                param="stream_options",
                code="invalid_type",
            )
        exclude = self._exclusions(body, endpoint)
        if self.config.log_prompts:
            log.info("rid=%s prompt=%s", rid, json.dumps(body)[:4096])
        route_req = await self._route_request(prompt, rid, len(raw), stream)  # chunked: no length
        flight.route, flight.model = route_req, model
        payload, strip_usage = self._upstream_payload(raw, body, endpoint, rid, stream)
        self.live.add(rid)
        last: _UpstreamFailed | None = None
        for attempt in range(self.config.max_attempts):
            flight.attempts = attempt + 1
            try:
                if attempt == 0 and self.scheduling is not None and not exclude:
                    now = flight.clock()
                    ticket = ticket_for(request, body, route_req, now)
                    decision = await self.scheduling.bind(ticket)
                    engine_priority = self.scheduling.engine_priority(rid)
                    if engine_priority is not None:  # SGLang's own field
                        payload = _splice(payload, body, {"priority": engine_priority})
                else:
                    routed = self._route(route_req, flight.clock(), exclude)
                    if routed is None:  # held (PD: no decode room yet)
                        routed = await self._wait_for_route(route_req)
                    decision = routed
            except NoBackendError:
                break
            if self._sharing:
                rec = self.core.record(rid)
                if rec is not None:
                    self.sync.routed(rec)
            flight.backend = decision.backend
            flight.predicted_cached = decision.predicted_cached_tokens
            flight.predicted_ttft_s = decision.predicted_ttft_s
            flight.routed_at = flight.clock()
            self.metrics.dispatch.observe(value=flight.routed_at - flight.started)
            if self.config.explain:
                flight.reason = route_reason(decision)
                log.debug("rid=%s route %s", rid, flight.reason)
            flight.ended = False
            self.metrics.routed.inc(decision.backend)
            if attempt:
                self.metrics.retries.inc()
            try:
                return await self._attempt(
                    request, endpoint, flight, payload, stream=stream, strip_usage=strip_usage
                )
            except _UpstreamFailed as failed:
                last = failed
                now = flight.clock()
                self._end(flight, ok=False)
                self.metrics.errors.inc("upstream_5xx" if failed.status else "upstream_connect")
                culprit = failed.backend or decision.backend
                self._report_failure(culprit, now, failed)
                exclude.add(culprit)
                log.warning("rid=%s backend=%s failed: %s", rid, culprit, failed.reason)
        headers = {"Retry-After": str(self.config.retry_after_s)}
        if last is not None:
            raise ApiError(
                503,
                f"all backends failed (last: {last.reason})",
                code="backend_unavailable",
                headers=headers,
            )
        raise ApiError(
            503, "no healthy backend available", code="no_healthy_backend", headers=headers
        )

    def _route(self, route_req: RouteRequest, now: float, exclude: set[str]) -> Decision | None:
        """Where the attempt goes (the PD proxy, router/server/pd.py, routes a pair here);
        None: held, `_wait_for_route` says where when it is released."""
        return self.core.route(route_req, now, exclude=exclude)

    async def _wait_for_route(self, route_req: RouteRequest) -> Decision:
        raise NotImplementedError("this proxy never holds a request")

    def _report_failure(self, backend: str, now: float, failed: _UpstreamFailed) -> None:
        """A backend failed an attempt before any byte reached the client."""
        self.pool.report_failure(backend, now, failed.reason, trip=failed.trip)

    def _upstream_payload(
        self, raw: bytes, body: dict[str, Any], endpoint: Endpoint, rid: str, stream: bool
    ) -> tuple[bytes, bool]:
        """Our rid in the body (so /abort_request can target it); usage asked for on streams.

        The client's bytes go upstream as they came, with the new keys spliced in before the
        closing brace: re-serialising a long prompt would cost more than routing it. A key
        the client already sent is replaced by re-serialising (JSON keys must stay unique).
        """
        extra: dict[str, Any] = {}
        if endpoint.kind != "generate" or not _batch_size(body):
            extra["rid"] = rid
        strip_usage = False
        if stream and endpoint.kind != "generate":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                extra["stream_options"] = {**(options or {}), "include_usage": True}
                strip_usage = True
        if not extra:
            return raw, strip_usage
        return _splice(raw, body, extra), strip_usage

    def _end(self, flight: _Flight, *, ok: bool) -> None:
        """The request's one ending in the core (finished or failed); later calls do nothing."""
        if flight.ended or flight.backend is None:
            return
        flight.ended = True
        now = flight.clock()
        if self._sharing:  # the record, before the ending forgets it
            rec = self.core.record(flight.rid)
            if rec is not None:
                self.sync.ended(rec)
        usage = flight.usage
        if ok and usage is not None:
            cached = usage.cached_tokens or 0
            self.core.on_finished(
                flight.rid, now, usage.completion_tokens or 0, usage.cached_tokens
            )
            if usage.prompt_tokens is not None:
                backend = flight.backend
                self.metrics.prompt_tokens.inc(backend, amount=usage.prompt_tokens)
                self.metrics.reported_cached.inc(backend, amount=cached)
                self.metrics.predicted_cached.inc(backend, amount=flight.predicted_cached)
                if usage.cached_tokens is not None:
                    error = usage.cached_tokens - flight.predicted_cached
                    self.metrics.cached_error.observe(backend, value=error)
        elif ok:
            self.core.on_finished(flight.rid, now, 0, None)
        else:
            self.core.on_failed(flight.rid, now)
        if self.scheduling is not None:
            self.scheduling.kick()

    def _first_token(self, flight: _Flight, cached: int | None) -> None:
        now = flight.clock()
        if flight.ttft_s is not None or flight.backend is None:
            return
        flight.ttft_s = now - flight.started
        if self._sharing:
            rec = self.core.record(flight.rid)
            if rec is not None:
                self.sync.first_token(rec)
        self.core.on_first_token(flight.rid, now, cached)
        if self.scheduling is not None:
            self.scheduling.kick()
        self.metrics.ttft.observe(flight.backend, value=flight.ttft_s)
        if flight.predicted_ttft_s is not None:  # observed as the client sees it, from arrival
            self.metrics.regret.observe(
                flight.backend, value=flight.ttft_s - flight.predicted_ttft_s
            )
            self.metrics.predicted_ttft.inc(flight.backend, amount=flight.predicted_ttft_s)

    def _abort_upstream(self, backend_url: str, rid: str) -> None:
        """Tell the backend to stop working on `rid` (fire and forget, kept referenced)."""

        async def abort() -> None:
            timeout = self.config.abort_timeout_s
            if not await abort_request(self.session, backend_url, rid, timeout=timeout):
                log.warning("rid=%s abort at %s failed", rid, backend_url)

        task = asyncio.get_running_loop().create_task(abort())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

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
        assert flight.backend is not None
        target = self._targets.get((flight.backend, endpoint.path))
        if target is None:  # parsed once per backend and path, not per request
            target = self.upstream.target(flight.backend + endpoint.path)
            self._targets[(flight.backend, endpoint.path)] = target
        headers = b"Content-Type: application/json\r\nX-Request-Id: %b\r\n" % (
            flight.rid.encode("ascii", "replace"),
        )
        try:
            try:
                upstream = await self.upstream.post(target, payload, headers)
            except (UpstreamError, TimeoutError) as exc:
                raise _UpstreamFailed(f"connect: {exc}", trip=True) from None
            try:
                return await self._answer(request, upstream, flight, endpoint, stream, strip_usage)
            finally:
                upstream.release()  # pooled when the body ended cleanly, else closed
        except asyncio.CancelledError:
            # the client went away (aiohttp cancels the handler): stop the backend's work too
            if not flight.ended:
                self._abort_upstream(flight.backend, flight.rid)
            raise

    async def _answer(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        flight: _Flight,
        endpoint: Endpoint,
        stream: bool,
        strip_usage: bool,
    ) -> web.StreamResponse:
        """The backend's answer, its head in: a 5xx to retry, a whole body, or a relayed stream."""
        assert flight.backend is not None
        if upstream.status >= 500:
            try:
                text = (await upstream.read())[:200].decode(errors="replace")
            except (UpstreamError, TimeoutError) as exc:
                text = f"(body lost: {exc})"
            raise _UpstreamFailed(
                f"status {upstream.status}: {text}", trip=False, status=upstream.status
            )
        self.pool.report_success(flight.backend)
        content_type = upstream.headers.get("content-type", "application/json")
        if not stream or upstream.status != 200 or "event-stream" not in content_type:
            try:
                raw = await upstream.read()
            except (UpstreamError, TimeoutError) as exc:
                raise _UpstreamFailed(f"body broke: {exc}", trip=True) from None
            if upstream.status == 200:
                flight.usage = _body_usage(raw, endpoint.kind)
                # no first-token event: a whole response's latency is not a TTFT
                self._end(flight, ok=True)
            else:
                self._end(flight, ok=False)
            out = _response_headers(flight, content_type)
            return answer(request, raw, upstream.status, out)
        out = _response_headers(flight, content_type, stream=True)
        response = streamed(request, upstream.status, out)
        return await self._relay(request, upstream, response, flight, endpoint, strip_usage)

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        response: web.StreamResponse,
        flight: _Flight,
        endpoint: Endpoint,
        strip_usage: bool,
    ) -> web.StreamResponse:
        """Relay the SSE events; parse only for feedback (router/server/sse.py).

        Until the first complete event the response is not prepared, so a backend that breaks
        before it is retried elsewhere; after that each upstream read goes to the client from
        the read callback (router/server/upstream.py) and this coroutine wakes only to drain
        a full client buffer and at the end.
        """
        assert flight.backend is not None
        generate = endpoint.kind == "generate"
        relay = SseRelay(
            generate=generate,
            on_first=lambda cached: self._first_token(flight, cached),
            on_usage=lambda events: self._feedback(flight, events, strip_usage),
        )
        broken: str | None = None
        try:
            events = b""
            while not events:  # the first complete event(s), reading paused after them
                chunk = await upstream.next_payload()
                if not chunk:
                    break
                events = relay.events_of(chunk)
            if events or relay.pending.strip():  # else nothing came: retried elsewhere
                writer = await _to_client(request, response, events)
                relay.transport = request.transport
                relay.chunked = getattr(writer, "chunked", True)
                relay.may_end = isinstance(response, StreamedResponse)
                await upstream.relay(relay, writer.drain, relay.raw_sink())
                if relay.pending.strip():
                    relay.done = relay.done or has_done(relay.pending)
                    await _to_client(request, response, relay.pending)
            if not relay.done:
                broken = "stream ended without [DONE]"
        except (UpstreamError, TimeoutError) as exc:
            broken = f"stream broke: {exc}"
        except (_ClientGone, ConnectionError):
            # the client reset the connection while we wrote to it
            self.metrics.errors.inc("client_disconnect")
            self._end(flight, ok=False)
            self._abort_upstream(flight.backend, flight.rid)
            flight.status = 499
            return response
        if broken is not None:
            if not response.prepared:
                raise _UpstreamFailed(f"{broken} (before any byte)", trip=True)
            # the first byte went out: never retried; the client gets an error event and the end
            self.metrics.errors.inc("stream_broken")
            self._end(flight, ok=False)
            now = flight.clock()
            self.pool.report_failure(flight.backend, now, broken, trip=True)
            log.warning("rid=%s backend=%s %s", flight.rid, flight.backend, broken)
            flight.status = 502
            with contextlib.suppress(ConnectionError):
                await response.write(sse_error_event("the backend failed mid-stream"))
                await response.write_eof()
            return response
        if generate and relay.last_data and flight.usage is None:
            payload = last_data(relay.last_data)
            if payload is not None:
                with contextlib.suppress(ValueError):
                    flight.usage = usage_from_sse_chunk(_loads(payload))
        self._end(flight, ok=True)
        if relay.ended and isinstance(response, StreamedResponse):
            response.end_written()
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    def _feedback(self, flight: _Flight, events: bytes, strip_usage: bool) -> bytes:
        """Read usage from the OpenAI events that carry it; drop it if the client did not ask.

        Only the event around each `"usage": {` is cut out and parsed (the other events of the
        read pass as they are); a rewritten chunk is serialised with orjson.
        """
        at = usage_at(events, 0)
        while at >= 0:
            start = events.rfind(b"\n\n", 0, at)
            start = 0 if start < 0 else start + 2
            end = events.find(b"\n\n", at)
            end = len(events) if end < 0 else end + 2
            replacement = self._usage_event(flight, events[start:end], strip_usage)
            events = events[:start] + replacement + events[end:]
            at = usage_at(events, start + len(replacement))
        return events

    def _usage_event(self, flight: _Flight, event: bytes, strip_usage: bool) -> bytes:
        """One event holding a usage object: read it; what the client gets of it."""
        data = data_of(event)
        if data is None:
            return event
        try:
            chunk = _loads(data)
        except ValueError:
            return event
        if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
            return event
        flight.usage = usage_from_sse_chunk(chunk)
        if not strip_usage:
            return event
        if not chunk.get("choices"):
            return b""  # the extra usage-only chunk the router asked for
        chunk.pop("usage", None)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


_DECODER = json.JSONDecoder()
_RID_UNSAFE = re.compile(r"[^\x21-\x7e]")  # outside printable ASCII: replaced in client ids


def _response_headers(
    flight: _Flight, content_type: str, *, stream: bool = False
) -> dict[str, str]:
    """What the client's response says besides the body: its type, ids and the route."""
    assert flight.backend is not None
    out = {"Content-Type": content_type}
    if stream:
        out["Cache-Control"] = "no-cache"
    out["X-Request-Id"] = flight.rid
    out["X-Prefix-Router-Backend"] = flight.backend
    if flight.reason is not None:
        out[REASON_HEADER] = flight.reason
    return out


def _batch_size(body: Mapping[str, Any]) -> int:
    """Prompts in a /generate batch (`text` list, `input_ids` list of lists); 0: not a batch.

    SGLang answers a batch, even of one, with a list and wants `rid` as a list then, so the
    router adds no scalar `rid` to a batch of one (and refuses larger ones: see `_forward`).
    """
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list):
        return len(text)
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return 0


def _body_usage(raw: bytes, kind: EndpointKind) -> TokenUsage | None:
    """Token counts of a whole response, parsing only its `usage` / `meta_info` object.

    Both sit at the end of SGLang's answers, so the last occurrence of the key is found and
    only its value decoded; anything unexpected falls back to parsing the whole body.
    """
    key = b'"meta_info"' if kind == "generate" else b'"usage"'
    first = raw[:1]
    if first.isspace():
        first = raw.lstrip()[:1]
    if first == b"[":
        return None  # a batch answer: no one request's counts
    at = raw.rfind(key)
    if at > 0 and raw[at - 1 : at] != b"\\":
        colon = raw.find(b":", at + len(key))
        if colon > 0 and not raw[at + len(key) : colon].strip():
            value = _tail_object(raw, colon + 1)
            if isinstance(value, dict):
                return usage_from_sse_chunk({key[1:-1].decode(): value})
    try:
        return usage_from_sse_chunk(_loads(raw))
    except ValueError:
        return None


def _tail_object(raw: bytes, start: int) -> Any:
    """The JSON value at `raw[start:]`: at once when it is the body's last (`{...}}`)."""
    tail = raw[start:].rstrip()
    if tail.endswith(b"}"):
        try:
            return orjson.loads(tail[:-1])
        except orjson.JSONDecodeError:
            pass
    try:
        return _DECODER.raw_decode(raw[start:].decode().lstrip())[0]
    except ValueError:
        return None


def _splice(raw: bytes, body: Mapping[str, Any], extra: Mapping[str, Any]) -> bytes:
    """`raw` (the JSON object `body`) with `extra`'s keys added, without re-serialising it."""
    text = raw.strip()
    if (
        any(key in body for key in extra)
        or not text.startswith(b"{")
        or not text.endswith(b"}")
        or b"\x00" in text[:4]  # UTF-16/32: not ours to splice
    ):
        try:  # not `body`: orjson turns ints past 64 bits into floats
            exact = json.loads(raw)
            return json.dumps({**exact, **extra}).encode()
        except RecursionError:  # json's limit sits a little below orjson's 1024 levels
            raise too_deep() from None
    parts = [orjson.dumps(key) + b": " + orjson.dumps(value) for key, value in extra.items()]
    return text[:-1] + (b", " if body else b"") + b", ".join(parts) + b"}"
