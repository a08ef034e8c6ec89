"""A simulated SGLang server: the sans-IO engine run in real time behind SGLang's HTTP API.

How it works. One `SimServer` owns one engine (`engine.Engine`, or anything with its API) and
one driver task. Model time is wall time since start multiplied by `speedup`. The driver loop:

    advance the engine to now -> hand its events (first token, finished, aborted) to the
    waiting requests -> for streaming requests in decode, read `progress()` and wake their
    handlers when it grew -> sleep until the engine's next event, the next streaming tick
    (`stream_interval_s`), or a new request / abort, whichever comes first.

HTTP handlers tokenize the prompt (offline cl100k, `textgen`), cut the token ids into pages of
`page_size` tokens and hash them into a chain (`page_chain`: equal id at depth i <=> equal
prefix through page i; the last page may be partial), submit a `SimRequest`, then await their
request's state. A client that goes away (aiohttp cancels the handler, or a write fails)
aborts the request in the engine in a `finally`, so its slot and KV are freed at once.

Endpoints (shapes as SGLang's `http_server.py`): `/generate`, `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/health`, `/health_generate`, `/get_model_info`,
`/model_info`, `/get_server_info`, `/server_info`, `/get_load`, `/v1/loads`, `/flush_cache`,
`/metrics` (Prometheus, `sglang:*`), `/abort_request`.

sglang-router 0.3.2 opens each worker with an HTTP/2 preface (`PRI * HTTP/2.0`, a gRPC probe)
before speaking HTTP/1.1. aiohttp answers it with a 400 and logs a traceback; `_QuietH2Filter`
drops exactly that log record on this server's own request-handler logger, nothing else.

All latencies this server reports are wall-clock seconds (at `speedup` X the simulated GPU is
simply X times faster). This module never imports `router`: it plays the GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from backends.sim import protocol as proto
from backends.sim.api import Aborted, EngineEvent, EngineLoad, Finished, FirstToken, SimRequest
from backends.sim.stats import ServerStats, render_metrics
from backends.sim.textgen import get_tokenizer

if TYPE_CHECKING:  # imported lazily at run time (see build_engine)
    from backends.sim.engine import EngineConfig
    from backends.sim.perf import Profile

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PROFILE",
    "EngineFigures",
    "EngineLike",
    "SimServer",
    "SimServerConfig",
    "SimServerHandle",
    "build_engine",
    "engine_figures",
    "page_chain",
    "start_sim_servers",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_PROFILE = "llama3-8b-h100"


class EngineLike(Protocol):
    """What the server needs from the engine (`backends.sim.engine.Engine` provides it)."""

    def add_request(self, request: SimRequest, now: float) -> object: ...

    def advance(self, now: float) -> Sequence[EngineEvent]: ...

    def next_event_time(self) -> float | None: ...

    def progress(self, rid: str, now: float) -> int: ...

    def abort(self, rid: str, now: float) -> bool: ...

    def load(self) -> EngineLoad: ...

    def flush_cache(self) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineFigures:
    """The engine's sizes as `/get_server_info` reports them."""

    profile: str
    max_total_num_tokens: int
    chunked_prefill_size: int
    max_prefill_tokens: int
    max_running_requests: int
    context_length: int = 131072
    schedule_policy: str = "fcfs"


@dataclass(frozen=True, slots=True, kw_only=True)
class SimServerConfig:
    """How one simulated server presents itself (the engine is configured separately)."""

    model: str = DEFAULT_MODEL
    page_size: int = 16
    speedup: float = 1.0
    context_length: int | None = None  # None: the profile's
    default_max_new_tokens: int = 128
    stream_interval_s: float = 0.02  # wall-clock period of streaming progress updates
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.page_size <= 0:
            raise ValueError("page_size must be positive")
        if self.speedup <= 0:
            raise ValueError("speedup must be positive")
        if self.context_length is not None and self.context_length <= 1:
            raise ValueError("context_length must be > 1")
        if self.default_max_new_tokens <= 0:
            raise ValueError("default_max_new_tokens must be positive")
        if self.stream_interval_s <= 0:
            raise ValueError("stream_interval_s must be positive")


def build_engine(profile: str, **config: Any) -> tuple[EngineLike, EngineFigures]:
    """A fresh engine for a named profile, with `EngineConfig` overrides, and its figures."""
    from backends.sim.engine import Engine, EngineConfig
    from backends.sim.perf import get_profile

    prof = get_profile(profile)
    cfg = EngineConfig(**config)
    return Engine(prof, cfg), engine_figures(profile, prof, cfg)


def engine_figures(profile: str, prof: Profile, cfg: EngineConfig) -> EngineFigures:
    """What `/get_server_info` says of an engine of `prof` configured by `cfg`."""
    return EngineFigures(
        profile=profile,
        max_total_num_tokens=prof.kv_capacity_tokens,
        chunked_prefill_size=cfg.chunked_prefill_size,
        max_prefill_tokens=cfg.max_prefill_tokens,
        max_running_requests=cfg.max_running_requests,
        context_length=prof.context_length,
        schedule_policy=cfg.schedule_policy,
    )


def page_chain(ids: Sequence[int], page_size: int) -> tuple[int, ...]:
    """Chained 64-bit ids of `page_size`-token pages; the last page may be partial.

    Pages are hashed as packed 64-bit integers (one C-level conversion for the whole prompt):
    the decimal text of every token cost ~12 ms per 30k tokens on the server's event loop.
    """
    try:
        data = array("q", ids).tobytes()
    except OverflowError:  # an id past 64 bits: only hand-made input_ids can hold one
        return _page_chain_text(ids, page_size)
    chain: list[int] = []
    parent = b"\x00" * 8
    step = page_size * 8
    blake2b = hashlib.blake2b
    for start in range(0, len(data), step):
        parent = blake2b(parent + data[start : start + step], digest_size=8).digest()
        chain.append(int.from_bytes(parent, "big") & 0x7FFF_FFFF_FFFF_FFFF)
    return tuple(chain)


def _page_chain_text(ids: Sequence[int], page_size: int) -> tuple[int, ...]:
    """page_chain for ids that do not fit 64 bits: each page's decimal text."""
    chain: list[int] = []
    parent = b"\x00" * 8
    for start in range(0, len(ids), page_size):
        page = b",".join(str(t).encode() for t in ids[start : start + page_size])
        parent = hashlib.blake2b(parent + page, digest_size=8).digest()
        chain.append(int.from_bytes(parent, "big") & 0x7FFF_FFFF_FFFF_FFFF)
    return tuple(chain)


class _QuietH2Filter(logging.Filter):
    """Drop the traceback aiohttp logs when a client opens with the HTTP/2 preface.

    llhttp reports the preface as "Pause on PRI/Upgrade"; the pure-Python parser rejects its
    request target "*". Any other bad request is still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            text = str(exc)
            if "PRI/Upgrade" in text or (type(exc).__name__ == "InvalidURLError" and "*" in text):
                return False
        return True


def _handler_logger() -> logging.Logger:
    """A private logger for aiohttp's request handler: `aiohttp.server`'s handlers, our filter.

    It is not registered with `logging`, so the filter affects this server only.
    """
    parent = logging.getLogger("aiohttp.server")
    quiet = logging.Logger("aiohttp.server")
    quiet.parent = parent
    quiet.addFilter(_QuietH2Filter())
    return quiet


@dataclass(slots=True)
class _Req:
    """A request in flight: what handlers wait on and the driver updates."""

    rid: str
    prompt_tokens: int
    output_tokens: int
    stream: bool
    arrival: float  # model time
    arrival_wall: float  # loop time
    text_offset: int
    created: int
    produced: int = 0
    cached_tokens: int = 0
    first_token: bool = False
    state: proto.FinishState = "running"
    end_wall: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class SimServer:
    """One engine in real time and the aiohttp application serving it."""

    def __init__(
        self,
        engine: EngineLike,
        figures: EngineFigures,
        config: SimServerConfig | None = None,
    ) -> None:
        self.engine = engine
        self.figures = figures
        self.config = config or SimServerConfig()
        self._reqs: dict[str, _Req] = {}
        self._stats = ServerStats()
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._host = ""
        self._port = 0
        self.app = self._build_app()

    @property
    def context_length(self) -> int:
        return self.config.context_length or self.figures.context_length

    # ------------------------------------------------------------------ time and driver

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _now(self) -> float:
        return (self._loop_time() - self._t0) * self.config.speedup

    def start_driver(self) -> None:
        """Start the real-time loop (idempotent); `start()` calls it."""
        if self._driver is None:
            self._t0 = self._loop_time()
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def stop_driver(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None

    def _advance(self, now: float) -> None:
        for ev in self.engine.advance(now):
            self._on_event(ev)

    async def _drive(self) -> None:
        speedup = self.config.speedup
        tick = self.config.stream_interval_s
        while True:
            now = self._now()
            self._advance(now)
            streaming = False
            for req in self._reqs.values():
                if req.stream and req.first_token and req.state == "running":
                    streaming = True
                    try:
                        produced = self.engine.progress(req.rid, now)
                    except KeyError:  # over in the engine; its event comes with next advance
                        continue
                    if produced > req.produced:
                        req.produced = produced
                        req.changed.set()
            nxt = self.engine.next_event_time()
            delay: float | None = None
            if nxt is not None:
                delay = max((nxt - now) / speedup, 0.0005)
            if streaming:
                delay = tick if delay is None else min(delay, tick)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _wall(self, model_time: float) -> float:
        return self._t0 + model_time / self.config.speedup

    def _on_event(self, ev: EngineEvent) -> None:
        req = self._reqs.get(ev.rid)
        if req is None:
            return
        if isinstance(ev, FirstToken):
            req.first_token = True
            req.cached_tokens = ev.cached_tokens
            req.produced = max(req.produced, 1)
            self._stats.ttft.observe(self._wall(ev.time) - req.arrival_wall)
        elif isinstance(ev, Finished):
            req.first_token = True
            req.produced = ev.output_tokens
            req.cached_tokens = ev.cached_tokens
            req.state = "length"
            req.end_wall = self._wall(ev.time)
            del self._reqs[ev.rid]
            self._stats.finished(
                at=req.end_wall,
                prompt=ev.prompt_tokens,
                cached=ev.cached_tokens,
                output=ev.output_tokens,
                e2e_s=req.end_wall - req.arrival_wall,
            )
        elif isinstance(ev, Aborted):
            self._end_aborted(req)
        req.changed.set()

    def _end_aborted(self, req: _Req) -> None:
        req.state = "abort"
        req.end_wall = self._loop_time()
        self._reqs.pop(req.rid, None)
        self._stats.aborted += 1
        req.changed.set()

    # ------------------------------------------------------------------ requests

    def _prompt_ids(self, gen: proto.GenRequest) -> Sequence[int]:
        """The prompt's token ids, tokenized on the event loop.

        Not on a worker thread, though the four simulated GPUs share this loop: measured on the
        multi-turn window (4 A/B runs), the thread's GIL hand-back (up to the 5 ms switch
        interval, on a busy loop) added ~25 ms to the mean client-seen TTFT, more than the
        2-3 ms an inline encode holds the loop.
        """
        if gen.input_ids is not None:
            return gen.input_ids
        return get_tokenizer().encode(gen.text or "")

    def _submit(
        self, gen: proto.GenRequest, ids: Sequence[int], body: Mapping[str, Any] | None = None
    ) -> _Req:
        """Check limits and hand the tokenized request to the engine (`_enter`).

        `body`: the request's JSON, for fields the parsed `gen` does not carry (PD bootstrap).
        """
        if gen.rid in self._reqs:
            raise proto.BadRequest(f"Duplicate request ID: {gen.rid}")
        n = len(ids)
        if n == 0:
            raise proto.BadRequest("The input is empty after tokenization.")
        ctx = self.context_length
        if n >= ctx:
            raise proto.BadRequest(
                f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        want = gen.max_new_tokens
        if want is None:
            want = self.config.default_max_new_tokens
        out = max(1, min(want, ctx - n))
        if n + out > self.figures.max_total_num_tokens:
            raise proto.BadRequest(
                f"The request needs {n + out} KV tokens, more than the server's pool "
                f"({self.figures.max_total_num_tokens} tokens)."
            )
        now = self._now()
        self._advance(now)
        req = _Req(
            rid=gen.rid,
            prompt_tokens=n,
            output_tokens=out,
            stream=gen.stream,
            arrival=now,
            arrival_wall=self._loop_time(),
            text_offset=n,
            created=int(time.time()),
        )
        sim = SimRequest(
            rid=gen.rid,
            blocks=page_chain(ids, self.config.page_size),
            block_size=self.config.page_size,
            prompt_tokens=n,
            output_tokens=out,
            priority=gen.priority,
        )
        self._enter(req, sim, now, body or {})
        self._reqs[gen.rid] = req
        self._wake.set()
        return req

    def _enter(self, req: _Req, sim: SimRequest, now: float, body: Mapping[str, Any]) -> None:
        """Hand a checked request to the engine; PD servers (backends/sim/pd_server.py) first
        publish or wait for its KV. May raise `proto.BadRequest` (nothing is recorded yet)."""
        self.engine.add_request(sim, now)

    def _abort(self, req: _Req) -> None:
        """Abort a request still in flight (client gone or `/abort_request`)."""
        if req.state != "running":
            return
        now = self._now()
        self._advance(now)
        if req.state != "running":
            return
        self.engine.abort(req.rid, now)
        self._advance(now)  # an engine may report the abort as an event
        if req.state == "running":
            self._end_aborted(req)
        self._wake.set()

    def abort_all(self) -> int:
        """Abort every request in flight (shutdown, `/abort_request` with abort_all)."""
        reqs = list(self._reqs.values())
        for req in reqs:
            self._abort(req)
        return len(reqs)

    def _progress(self, req: _Req) -> proto.Progress:
        end = req.end_wall if req.end_wall is not None else self._loop_time()
        return proto.Progress(
            rid=req.rid,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=req.produced,
            cached_tokens=req.cached_tokens,
            state=req.state,
            e2e_latency=end - req.arrival_wall,
            text_offset=req.text_offset,
            created=req.created,
        )

    async def _wait_done(self, req: _Req) -> None:
        while req.state == "running":
            await req.changed.wait()
            req.changed.clear()

    # ------------------------------------------------------------------ HTTP

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_route("*", "/generate", self._h_generate)
        r.add_post("/v1/completions", self._h_completions)
        r.add_post("/v1/chat/completions", self._h_chat)
        r.add_get("/v1/models", self._h_models)
        r.add_get("/health", self._h_health)
        r.add_get("/health_generate", self._h_health_generate)
        r.add_get("/get_model_info", self._h_model_info)
        r.add_get("/model_info", self._h_model_info)
        r.add_get("/get_server_info", self._h_server_info)
        r.add_get("/server_info", self._h_server_info)
        r.add_get("/get_load", self._h_get_load)
        r.add_get("/v1/loads", self._h_loads)
        r.add_route("*", "/flush_cache", self._h_flush_cache)
        r.add_post("/abort_request", self._h_abort)
        r.add_get("/metrics", self._h_metrics)
        return app

    async def _json_body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise proto.BadRequest(f"Invalid JSON body: {exc}") from None

    async def _h_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            gen = proto.parse_generate(body)
            req = self._submit(gen, self._prompt_ids(gen), body)
        except proto.BadRequest as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        return await self._serve(request, req, gen)

    async def _h_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, proto.parse_completion)

    async def _h_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, proto.parse_chat)

    async def _openai(
        self, request: web.Request, parse: Callable[[Any], proto.GenRequest]
    ) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            gen = parse(body)
            req = self._submit(gen, self._prompt_ids(gen), body)
        except proto.BadRequest as exc:
            return web.json_response(proto.openai_error(str(exc)), status=400)
        return await self._serve(request, req, gen)

    async def _serve(
        self, request: web.Request, req: _Req, gen: proto.GenRequest
    ) -> web.StreamResponse:
        """Answer one submitted request; whatever ends the handler early aborts it."""
        try:
            if not gen.stream:
                await self._wait_done(req)
                return web.json_response(self._final_body(req, gen))
            return await self._stream(request, req, gen)
        finally:
            self._abort(req)  # no-op when it finished

    def _final_body(self, req: _Req, gen: proto.GenRequest) -> dict[str, Any]:
        p = self._progress(req)
        model = gen.model or self.config.model
        if gen.kind == "chat":
            return proto.chat_response(p, model)
        if gen.kind == "completion":
            return proto.completion_response(p, model)
        return proto.generate_response(p, stream=False)

    async def _stream(
        self, request: web.Request, req: _Req, gen: proto.GenRequest
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        model = gen.model or self.config.model
        sent = 0
        first = True
        try:
            while True:
                await req.changed.wait()
                req.changed.clear()
                p = self._progress(req)
                done = req.state != "running"
                if p.completion_tokens > sent or done:
                    if gen.kind == "generate":
                        chunk = proto.generate_response(p, stream=True)
                    elif gen.kind == "chat":
                        chunk = proto.chat_chunk(p, model, sent_tokens=sent, role=first)
                    else:
                        chunk = proto.completion_chunk(p, model, sent_tokens=sent)
                    # orjson: compact like SGLang's pydantic output, and a fraction of json's
                    # CPU per chunk (four simulated GPUs share a laptop's cores with the router)
                    await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                    sent = p.completion_tokens
                    first = False
                if done:
                    break
            if gen.include_usage:
                usage = proto.usage_chunk(self._progress(req), model, gen.kind)
                await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            log.debug("client went away mid-stream: request %s aborted", req.rid)
        return resp

    async def _h_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "sglang",
                        "root": self.config.model,
                        "max_model_len": self.context_length,
                    }
                ],
            }
        )

    async def _h_health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _h_health_generate(self, request: web.Request) -> web.Response:
        """Like SGLang: push one 1-token request through the engine."""
        gen = proto.GenRequest(
            kind="generate",
            rid=f"HEALTH_CHECK_{time.time()}",
            input_ids=(0,),
            text=None,
            max_new_tokens=1,
            stream=False,
        )
        req = self._submit(gen, (0,))
        try:
            await asyncio.wait_for(self._wait_done(req), 20.0)
        except TimeoutError:
            return web.Response(status=503)
        finally:
            self._abort(req)
        return web.Response(status=200)

    async def _h_model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.config.model,
                "tokenizer_path": self.config.model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
            }
        )

    async def _h_server_info(self, request: web.Request) -> web.Response:
        f = self.figures
        load = self.engine.load()
        return web.json_response(
            {
                "model_path": self.config.model,
                "tokenizer_path": self.config.model,
                "served_model_name": self.config.model,
                "host": self._host,
                "port": self._port,
                "page_size": self.config.page_size,
                "context_length": self.context_length,
                "max_total_num_tokens": f.max_total_num_tokens,
                "chunked_prefill_size": f.chunked_prefill_size,
                "max_prefill_tokens": f.max_prefill_tokens,
                "max_running_requests": f.max_running_requests,
                "schedule_policy": f.schedule_policy,
                "disable_radix_cache": False,
                "tp_size": 1,
                "dp_size": 1,
                "max_req_input_len": self.context_length - 1,
                "internal_states": [
                    {
                        "last_gen_throughput": self._stats.gen_throughput(self._loop_time()),
                        "load": load.running + load.waiting,
                    }
                ],
                "version": "sim",
                "sim_profile": f.profile,
                "sim_speedup": self.config.speedup,
            }
        )

    async def _h_get_load(self, request: web.Request) -> web.Response:
        load = self.engine.load()
        return web.json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": load.running + load.waiting,
                    "num_waiting_reqs": load.waiting,
                    "num_tokens": load.kv_used_tokens,
                }
            ]
        )

    async def _h_loads(self, request: web.Request) -> web.Response:
        load = self.engine.load()
        st = self._stats
        cap = max(load.kv_capacity_tokens, 1)
        entry = {
            "dp_rank": 0,
            "num_running_reqs": load.running,
            "num_waiting_reqs": load.waiting,
            "num_used_tokens": load.kv_used_tokens,
            "num_total_tokens": load.kv_used_tokens + load.waiting_prefill_tokens,
            "num_waiting_uncached_tokens": load.waiting_prefill_tokens,
            "max_total_num_tokens": load.kv_capacity_tokens,
            "token_usage": round(load.kv_used_tokens / cap, 4),
            "gen_throughput": round(st.gen_throughput(self._loop_time()), 2),
            "cache_hit_rate": round(st.cache_hit_rate, 4),
            "utilization": round(load.running / max(self.figures.max_running_requests, 1), 4),
            "max_running_requests": self.figures.max_running_requests,
            "num_total_reqs": load.running + load.waiting,
        }
        return web.json_response(
            {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "version": "sim",
                "dp_rank_count": 1,
                "loads": [entry],
                "aggregate": {
                    "total_running_reqs": load.running,
                    "total_waiting_reqs": load.waiting,
                    "total_reqs": load.running + load.waiting,
                    "avg_token_usage": entry["token_usage"],
                    "avg_throughput": entry["gen_throughput"],
                    "avg_utilization": entry["utilization"],
                },
            }
        )

    async def _h_flush_cache(self, request: web.Request) -> web.Response:
        ok = self.engine.flush_cache()
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)\n",
            status=200 if ok else 400,
        )

    async def _h_abort(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except proto.BadRequest as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "body must be an object"}}, status=400)
        if body.get("abort_all"):
            targets = list(self._reqs.values())
        else:
            rid = body.get("rid")
            if not isinstance(rid, str):
                return web.json_response({"error": {"message": "'rid' is required"}}, status=400)
            found = self._reqs.get(rid)
            targets = [found] if found is not None else []
        for req in targets:
            self._abort(req)
        return web.json_response({"aborted": [r.rid for r in targets]})

    async def _h_metrics(self, request: web.Request) -> web.Response:
        text = render_metrics(self._stats, self.engine.load(), self.config.model, self._loop_time())
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------ lifecycle

    def bind(self, host: str, port: int) -> None:
        """Record where this server listens (reported by `/get_server_info`)."""
        self._host, self._port = host, port

    async def on_start(self, host: str) -> None:
        """Listening and driving: start what else the server runs (a PD bootstrap server)."""

    async def on_close(self) -> None:
        """Stopped: close what `on_start` opened."""


class SimServerHandle:
    """A simulated server listening on a port: `.url`, `.server` (engine inside), `close()`."""

    def __init__(self, server: SimServer, runner: web.AppRunner, host: str, port: int) -> None:
        self.server = server
        self._runner = runner
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"

    @property
    def engine(self) -> EngineLike:
        return self.server.engine

    async def close(self) -> None:
        """Abort what is in flight (handlers end at once), stop listening, stop the driver."""
        self.server.abort_all()
        await self._runner.cleanup()
        await self.server.stop_driver()
        await self.server.on_close()

    @classmethod
    async def start(cls, server: SimServer, host: str, port: int) -> SimServerHandle:
        """Listen on host:port (0 = ephemeral) and start the engine's real-time driver."""
        get_tokenizer()  # load the BPE ranks now, not inside the first request's TTFT
        runner = web.AppRunner(
            server.app,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=2.0,
            access_log=logging.getLogger("aiohttp.access") if server.config.access_log else None,
            logger=_handler_logger(),
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = port
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                bound = int(addr[1])
                break
        server.bind(host, bound)
        server.start_driver()
        try:
            await server.on_start(host)
        except BaseException:
            await runner.cleanup()
            await server.stop_driver()
            raise
        return cls(server, runner, host, bound)


async def start_sim_servers(
    count: int,
    *,
    host: str = "127.0.0.1",
    base_port: int = 0,
    profile: str = DEFAULT_PROFILE,
    model: str = DEFAULT_MODEL,
    page_size: int = 16,
    speedup: float = 1.0,
    config: SimServerConfig | None = None,
    engine_config: Mapping[str, Any] | None = None,
    engine_factory: Callable[[], tuple[EngineLike, EngineFigures]] | None = None,
) -> list[SimServerHandle]:
    """Start `count` simulated servers (one engine each) on base_port.. (0: ephemeral ports).

    `config`, when given, overrides `model`, `page_size` and `speedup`. `engine_config` holds
    `EngineConfig` overrides (e.g. schedule_policy). `engine_factory` replaces
    `build_engine(profile, ...)` altogether (tests, custom engines).
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    cfg = config or SimServerConfig(model=model, page_size=page_size, speedup=speedup)
    handles: list[SimServerHandle] = []
    try:
        for i in range(count):
            if engine_factory is not None:
                engine, figures = engine_factory()
            else:
                overrides = {"page_size": cfg.page_size, **(engine_config or {})}
                engine, figures = build_engine(profile, **overrides)
            port = 0 if base_port == 0 else base_port + i
            handles.append(await SimServerHandle.start(SimServer(engine, figures, cfg), host, port))
    except BaseException:
        for h in handles:
            await h.close()
        raise
    return handles
