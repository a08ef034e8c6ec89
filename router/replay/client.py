"""HTTP replay client: send a trace's requests at their arrival times and time every stream.

Open loop. Every request gets its own task that sleeps until its arrival (trace timestamp /
load / speedup, on the event loop's clock from the replay's start), then sends, so a slow
server never slows the sender; a semaphore (`max_in_flight`, far above any real load) only
guards against runaway memory. The requests go through the router's own keep-alive HTTP/1.1
client (`router.server.upstream.Upstream`): each read is parsed and stamped in the socket's
read callback, with no stream reader or task wake-up per read, so the instrument spends little
of the CPU it shares with what it measures (on one box, with simulated GPUs), and a read's
timestamp is when its bytes arrived.

Each request streams. Per API the client asks for what it needs to account for the request:

    chat         POST /v1/chat/completions  messages, max_tokens, ignore_eos, stream_options
    completions  POST /v1/completions       prompt,   max_tokens, ignore_eos, stream_options
    generate     POST /generate             text, sampling_params{max_new_tokens, ignore_eos}

`max_tokens` is the trace's output length and `ignore_eos` (SGLang honours it) makes the
server write exactly that many tokens. Prompts come from the trace: recorded `messages` for
chat logs, else `BlockTextGenerator` text per `hash_ids` block (shared ids -> shared text).

Measured per request (from just before the POST): TTFT = first chunk carrying output text;
TPOT = (last token chunk - first token chunk) / (output tokens - 1); E2E = end of stream.
Prompt, output and cached tokens come from `usage` (OpenAI, `prompt_tokens_details.
cached_tokens`) or `meta_info` (SGLang); the backend from our router's `X-Prefix-Router-Backend`
header (None behind other routers). With `speedup` F (simulated servers running F times
faster than the wall clock) sending is F times faster and every measured time is multiplied by
F, so results read in the trace's own seconds.

Every request ends in exactly one `RequestOutcome`; failures carry `error` as
"HTTP <status>: <message>" (a non-200 answer), "stream error: ..." (an error or abort inside the
stream), "connection error: ..." or "timeout". `failure_status` reads the status back.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

from router.replay.metrics import RequestOutcome, summarize
from router.replay.textgen import BlockTextGenerator
from router.replay.traces import Trace, TraceRequest
from router.server.upstream import Target, Upstream, UpstreamError

__all__ = [
    "API_PATHS",
    "BACKEND_HEADER",
    "Api",
    "ReplayConfig",
    "ReplayRun",
    "build_request",
    "check_trace_api",
    "discover_model",
    "failure_status",
    "replay",
    "run_summary",
]

Api = Literal["chat", "completions", "generate"]

API_PATHS: Mapping[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "generate": "/generate",
}

BACKEND_HEADER = "X-Prefix-Router-Backend"  # our router names the backend it chose
_BACKEND_HEADER_KEY = BACKEND_HEADER.lower()  # `Upstream` lower-cases header names
_LOOKAHEAD_S = 0.5  # bodies are built this long before they are due
_STATUS = re.compile(r"^HTTP (\d{3})\b")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayConfig:
    """Where and how to replay. `speedup` > 1 only for simulated servers run faster than life."""

    url: str
    api: Api = "completions"
    model: str | None = None
    api_key: str | None = None
    load: float = 1.0
    speedup: float = 1.0
    max_in_flight: int = 8192
    request_timeout_s: float = 900.0
    text_seed: int = 0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.api not in API_PATHS:
            raise ValueError(f"api must be one of {', '.join(API_PATHS)}, got {self.api!r}")
        if not self.load > 0:
            raise ValueError("load must be positive")
        if not self.speedup > 0:
            raise ValueError("speedup must be positive")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not self.request_timeout_s > 0:
            raise ValueError("request_timeout_s must be positive")


@dataclass(slots=True, kw_only=True)
class ReplayRun:
    """All outcomes of one replay (in arrival order) and how long it took on the wall clock."""

    outcomes: list[RequestOutcome]
    wall_s: float
    model: str | None = None
    late_s_max: float = 0.0  # worst lag between a request's due time and its send
    extra: dict[str, Any] = field(default_factory=dict)


def failure_status(error: str | None) -> int | None:
    """The HTTP status of a failure recorded as "HTTP <status>: ...", else None."""
    if error is None:
        return None
    m = _STATUS.match(error)
    return int(m.group(1)) if m else None


def _chat_only(api: str) -> str:
    return f"a chat-log trace replays only with --api chat, not --api {api}"


def check_trace_api(trace: Trace, api: Api) -> None:
    """ValueError before replaying if the trace holds chat logs and `api` cannot carry them."""
    if api != "chat" and any(r.messages is not None for r in trace.requests):
        raise ValueError(_chat_only(api))


def build_request(
    treq: TraceRequest,
    *,
    api: Api,
    model: str | None,
    texts: BlockTextGenerator | None,
    rid: str,
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for one trace request; ValueError if the trace cannot feed this API."""
    if treq.messages is not None:
        if api != "chat":
            raise ValueError(_chat_only(api))
        messages: list[Any] = list(treq.messages)
        text = ""
    else:
        if texts is None:
            raise ValueError("a hash_ids trace needs a BlockTextGenerator")
        text = texts.prompt_text(treq.hash_ids, treq.input_length)
        messages = [{"role": "user", "content": text}]
    body: dict[str, Any]
    if api == "generate":
        body = {
            "text": text,
            "sampling_params": {
                "max_new_tokens": treq.output_length,
                "ignore_eos": True,
                "temperature": 0.0,
            },
            "stream": True,
            "rid": rid,
        }
    else:
        body = {
            "max_tokens": treq.output_length,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if api == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = text
        if model is not None:
            body["model"] = model
    return API_PATHS[api], body


async def discover_model(session: aiohttp.ClientSession, url: str) -> str | None:
    """The first model `GET /v1/models` lists, or None if the endpoint does not say."""
    try:
        async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return None
            data = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    try:
        name = data["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) else None


@dataclass(slots=True)
class _Stream:
    """What one streamed response has said so far."""

    first: float | None = None
    last: float | None = None
    chunks: int = 0
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None
    backend: str | None = None  # where our router sent it (its X-Prefix-Router-Backend header)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_usage(st: _Stream, usage: Any) -> None:
    if not isinstance(usage, Mapping):
        return
    st.prompt_tokens = _int(usage.get("prompt_tokens")) or st.prompt_tokens
    st.output_tokens = _int(usage.get("completion_tokens")) or st.output_tokens
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else None
    if cached is None:
        cached = _int(usage.get("cached_tokens"))
    if cached is not None:
        st.cached_tokens = cached


def _on_chunk(st: _Stream, api: Api, chunk: Any, now: float) -> None:
    """Fold one SSE data object into the stream's state."""
    if not isinstance(chunk, Mapping):
        return
    if "error" in chunk or chunk.get("object") == "error":
        err = chunk.get("error", chunk)
        msg = err.get("message") if isinstance(err, Mapping) else err
        st.error = f"stream error: {msg}"
        return
    got_token = False
    if api == "generate":
        meta = chunk.get("meta_info")
        if isinstance(meta, Mapping):
            done = _int(meta.get("completion_tokens"))
            if done is not None and done > (st.output_tokens or 0):
                got_token = True
                st.output_tokens = done
            st.prompt_tokens = _int(meta.get("prompt_tokens")) or st.prompt_tokens
            cached = _int(meta.get("cached_tokens"))
            if cached is not None:
                st.cached_tokens = cached
            reason = meta.get("finish_reason")
            if isinstance(reason, Mapping) and reason.get("type") == "abort":
                st.error = f"stream error: aborted ({reason.get('message', '')})"
        elif chunk.get("text"):
            got_token = True
    else:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, Mapping) else choice.get("text")
            if text:
                got_token = True
            if choice.get("finish_reason") == "abort":
                st.error = "stream error: aborted"
        _read_usage(st, chunk.get("usage"))
    if got_token:
        st.chunks += 1
        if st.first is None:
            st.first = now
        st.last = now


class _SseReader:
    """Folds a stream's SSE lines into its `_Stream`, called in the socket's read callback.

    Each read is stamped when it arrives (`loop.time()` in `data_received`), not when a task
    gets round to it: on a busy box that wake-up is the client's own lateness, not the
    server's.
    """

    __slots__ = ("_api", "_buf", "_loop", "_st")

    def __init__(self, st: _Stream, api: Api, loop: asyncio.AbstractEventLoop) -> None:
        self._st = st
        self._api = api
        self._loop = loop
        self._buf = b""

    def feed(self, piece: bytes) -> bool:
        """The `Upstream` sink: never asks for a drain (nothing is written onwards)."""
        buf = self._buf + piece
        if b"\n" not in piece:
            self._buf = buf
            return False
        lines = buf.split(b"\n")
        self._buf = lines.pop()  # an incomplete last line waits for the next read
        now = self._loop.time()
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:  # orjson: the client must not eat the CPU of what it measures
                chunk = orjson.loads(data)
            except ValueError:
                continue
            _on_chunk(self._st, self._api, chunk, now)
        return False


async def _never_drain() -> None:
    return None


async def _one(
    upstream: Upstream,
    target: Target,
    config: ReplayConfig,
    payload: bytes,
    headers: bytes,
) -> tuple[_Stream, float, float]:
    """POST one JSON `payload` and read its stream; returns (state, sent at, ended at)."""
    st = _Stream()
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        async with asyncio.timeout(config.request_timeout_s):
            resp = await upstream.post(target, payload, headers)
            st.backend = resp.headers.get(_BACKEND_HEADER_KEY)
            if resp.status != 200:
                raw = (await resp.read()).decode("utf-8", errors="replace")
                st.error = f"HTTP {resp.status}: {_error_message(raw)}"
                return st, sent, loop.time()
            await resp.relay(_SseReader(st, config.api, loop).feed, _never_drain)
    except TimeoutError:
        st.error = f"timeout after {config.request_timeout_s:g} s"
    except (UpstreamError, OSError) as exc:
        st.error = f"connection error: {type(exc).__name__}: {exc}"
    return st, sent, loop.time()


def _error_message(raw: str) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw.strip()[:300]
    if isinstance(obj, Mapping):
        err = obj.get("error", obj)
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return raw.strip()[:300]


async def replay(
    trace: Trace,
    config: ReplayConfig,
    *,
    on_done: Callable[[RequestOutcome], None] | None = None,
) -> ReplayRun:
    """Replay every request of `trace` against `config.url`; one outcome per request."""
    texts = (
        BlockTextGenerator(trace.block_size, seed=config.text_seed)
        if any(r.messages is None for r in trace.requests)
        else None
    )
    headers = b"Content-Type: application/json\r\nUser-Agent: prefix-router-replay\r\n"
    if config.api_key:
        headers += f"Authorization: Bearer {config.api_key}\r\n".encode("latin-1")
    scale = config.speedup
    gate = asyncio.Semaphore(config.max_in_flight)
    outcomes: list[RequestOutcome] = []
    late = 0.0
    started_wall = time.perf_counter()
    model = config.model
    if model is None and config.api != "generate":
        async with aiohttp.ClientSession() as session:
            model = await discover_model(session, config.url)
    upstream = Upstream(connect_timeout_s=10.0, read_timeout_s=config.request_timeout_s)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2

        async def run_one(
            position: int, treq: TraceRequest, due: float, path: str, payload: bytes
        ) -> None:
            nonlocal late
            await asyncio.sleep(max(due - loop.time(), 0.0))
            async with gate:
                late = max(late, loop.time() - due)
                target = upstream.target(config.url + path)
                st, sent, ended = await _one(upstream, target, config, payload, headers)
            outcome = _outcome(
                f"r{position}", treq.timestamp / config.load, treq, st, sent, ended, scale
            )
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)

        # One scheduler builds and serialises each body shortly before it is due (prompt text
        # costs CPU, and a long trace should not hold every prompt at once), then hands it to
        # its own task.
        tasks: list[asyncio.Task[None]] = []
        try:
            for position, treq in enumerate(trace.requests):
                due = t0 + treq.timestamp / config.load / scale
                ahead = due - _LOOKAHEAD_S - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                path, body = build_request(
                    treq, api=config.api, model=model, texts=texts, rid=f"r{position}"
                )
                # serialised here, ahead of its due time, not inside the timed POST
                payload = orjson.dumps(body)
                tasks.append(asyncio.create_task(run_one(position, treq, due, path, payload)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    finally:
        upstream.close()
    outcomes.sort(key=lambda o: (o.arrival, int(o.rid[1:])))
    return ReplayRun(
        outcomes=outcomes,
        wall_s=time.perf_counter() - started_wall,
        model=model,
        late_s_max=late * scale,
    )


def _outcome(
    rid: str,
    arrival: float,
    treq: TraceRequest,
    st: _Stream,
    sent: float,
    ended: float,
    scale: float,
) -> RequestOutcome:
    prompt = st.prompt_tokens if st.prompt_tokens is not None else treq.input_length
    error = st.error
    if error is None and st.first is None:
        error = "stream error: the response ended without any output token"
    if error is not None:
        return RequestOutcome(
            rid=rid,
            arrival=arrival,
            prompt_tokens=prompt,
            output_tokens=st.output_tokens or 0,
            cached_tokens=st.cached_tokens or 0,
            ttft=None,
            tpot=None,
            e2e=None,
            backend=st.backend,
            error=error,
        )
    assert st.first is not None and st.last is not None
    output = st.output_tokens if st.output_tokens is not None else st.chunks
    tpot = (st.last - st.first) / (output - 1) * scale if output > 1 else None
    return RequestOutcome(
        rid=rid,
        arrival=arrival,
        prompt_tokens=prompt,
        output_tokens=output,
        cached_tokens=st.cached_tokens or 0,
        ttft=(st.first - sent) * scale,
        tpot=tpot,
        e2e=(ended - sent) * scale,
        backend=st.backend,
    )


def run_summary(run: ReplayRun) -> dict[str, Any]:
    """The DESIGN section 7 block for one replay, plus every failure with its status."""
    out = summarize(run.outcomes, wall_s=run.wall_s)
    out["late_s_max"] = run.late_s_max
    out["failures"] = [
        {"rid": o.rid, "status": failure_status(o.error), "error": o.error}
        for o in run.outcomes
        if o.failed
    ]
    return out
