"""The router's knowledge of SGLang backends: what to ask them and how to read their answers.

Two halves, both free of the router's server code:

- small async helpers taking the caller's `aiohttp.ClientSession` (one per app, as aiohttp
  recommends): `fetch_server_info` (model, KV capacity, page size, scheduler limits, HiCache
  host pool; tries `/get_server_info` then `/server_info`, and `/get_model_info`,
  `/model_info` or `/v1/models` for the model name), `fetch_load` (`/v1/loads`, falling back
  to `/get_load`), `check_health`, `abort_request`;
- pure parsers for what the live proxy relays: `cached_tokens_from_openai` (OpenAI
  `usage.prompt_tokens_details.cached_tokens`), `cached_tokens_from_meta` (SGLang
  `meta_info.cached_tokens`) and `usage_from_sse_chunk`, which reads token counts from one
  server-sent event of either a `/generate` stream (cumulative `meta_info`) or an OpenAI
  stream (a `usage` object, present on the last chunk when `include_usage` is set).

A missing field is `None`, never a guess; malformed input to a parser returns `None` too,
because a proxy must not fail a user's stream over bookkeeping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

__all__ = [
    "BackendError",
    "BackendLoad",
    "KVEventsInfo",
    "ServerInfo",
    "TokenUsage",
    "abort_request",
    "cached_tokens_from_meta",
    "cached_tokens_from_openai",
    "check_health",
    "fetch_load",
    "fetch_server_info",
    "parse_kv_events",
    "parse_load",
    "parse_server_info",
    "usage_from_sse_chunk",
]

_DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


class BackendError(RuntimeError):
    """A backend did not answer as SGLang does (unreachable, error status, wrong shape)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KVEventsInfo:
    """Where a backend publishes KV events (`/server_info` `kv_events`, SGLang >= 0.5.2x).

    One ZMQ PUB socket per data-parallel rank, on ports `port_base`..`port_base+dp_size-1`.
    `host` None: the publisher binds a wildcard, so reach it at the backend's own host.
    """

    host: str | None
    port_base: int
    topic: str = ""
    block_size: int = 1
    dp_size: int = 1

    def endpoints(self, backend_url: str) -> list[str]:
        host = self.host or (urlsplit(backend_url).hostname or "127.0.0.1")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return [f"tcp://{host}:{self.port_base + rank}" for rank in range(self.dp_size)]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerInfo:
    """What a backend says about itself; `None` where it did not say."""

    model: str  # the served model name (what clients put in `model`)
    model_path: str | None = None
    max_total_num_tokens: int | None = None  # KV capacity in tokens
    page_size: int = 1
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int | None = None
    max_running_requests: int | None = None
    context_length: int | None = None
    version: str | None = None
    # SGLang's hierarchical cache (HiCache) server args; None where the server did not say
    hierarchical_cache: bool | None = None  # enable_hierarchical_cache
    hicache_ratio: float | None = None  # host pool = ratio x device pool (tokens)
    hicache_size_gb: float | None = None  # host pool in GB per rank; > 0 overrides the ratio
    tp_size: int | None = None
    kv_events: KVEventsInfo | None = None  # the server publishes KV events here

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be non-empty")
        if self.page_size <= 0:
            raise ValueError("page_size must be positive")

    def host_cache_tokens(self, kv_bytes_per_token: float | None = None) -> int | None:
        """Tokens in the HiCache host pool, sized as SGLang sizes it; None if not reported.

        SGLang's host pool holds `hicache_size` GB per tensor-parallel rank when that is set
        (tokens = bytes / per-rank KV bytes per token, which only a model profile can tell:
        `kv_bytes_per_token` is the whole model's), else `hicache_ratio` x the device pool.
        0 when hierarchical cache is off.
        """
        if self.hierarchical_cache is None:
            return None
        if not self.hierarchical_cache:
            return 0
        size = self.hicache_size_gb or 0.0
        if size > 0 and kv_bytes_per_token and kv_bytes_per_token > 0:
            per_rank = kv_bytes_per_token / max(self.tp_size or 1, 1)
            return int(size * 1e9 // per_rank)
        ratio = self.hicache_ratio if self.hicache_ratio is not None else 2.0
        if self.max_total_num_tokens is None or ratio <= 0:
            return None
        return int(self.max_total_num_tokens * ratio)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendLoad:
    """A backend's reported load (`/v1/loads` aggregate, or `/get_load`)."""

    running: int
    waiting: int
    used_tokens: int | None = None
    max_total_num_tokens: int | None = None
    cache_hit_rate: float | None = None  # mean over data-parallel ranks


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenUsage:
    """Token counts read from a response or stream chunk; None where not reported."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finished: bool = False  # the chunk carries a finish reason


def _int(value: Any) -> int | None:
    if type(value) is int:  # the usual case first: this runs several times per request
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _base(url: str) -> str:
    return url.rstrip("/")


async def _get_json(
    session: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout
) -> Any:
    """GET and decode JSON; None on 404/405 (endpoint absent), BackendError otherwise."""
    try:
        async with session.get(url, timeout=timeout) as resp:
            if resp.status in (404, 405):
                return None
            if resp.status != 200:
                raise BackendError(f"GET {url}: HTTP {resp.status}")
            return await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        raise BackendError(f"GET {url}: {type(exc).__name__}: {exc}") from exc


def parse_server_info(info: Mapping[str, Any], model_name: str | None = None) -> ServerInfo:
    """Build a `ServerInfo` from a `/get_server_info` body (and a model name found elsewhere)."""
    model_path = info.get("model_path")
    served = info.get("served_model_name")
    name = model_name or (served if isinstance(served, str) and served else None)
    if name is None and isinstance(model_path, str) and model_path:
        name = model_path
    if name is None:
        raise BackendError("server info names no model")
    page = _int(info.get("page_size"))
    version = info.get("version")
    hicache = info.get("enable_hierarchical_cache")
    return ServerInfo(
        model=name,
        model_path=model_path if isinstance(model_path, str) else None,
        max_total_num_tokens=_int(info.get("max_total_num_tokens")),
        page_size=page if page and page > 0 else 1,
        chunked_prefill_size=_int(info.get("chunked_prefill_size")),
        max_prefill_tokens=_int(info.get("max_prefill_tokens")),
        max_running_requests=_int(info.get("max_running_requests")),
        context_length=_int(info.get("context_length")),
        version=version if isinstance(version, str) else None,
        hierarchical_cache=hicache if isinstance(hicache, bool) else None,
        hicache_ratio=_float(info.get("hicache_ratio")),
        hicache_size_gb=_float(info.get("hicache_size")),
        tp_size=_int(info.get("tp_size")),
        kv_events=parse_kv_events(info),
    )


def parse_kv_events(info: Mapping[str, Any]) -> KVEventsInfo | None:
    """The `kv_events` block of `/server_info` (None when the server publishes none)."""
    block = info.get("kv_events")
    if not isinstance(block, Mapping) or block.get("publisher") != "zmq":
        return None
    port = _int(block.get("endpoint_port_base"))
    if port is None or not 0 < port < 65536:
        return None
    host = block.get("endpoint_host")
    topic = block.get("topic")
    size = _int(block.get("block_size"))
    dp = _int(block.get("dp_size"))
    return KVEventsInfo(
        host=host if isinstance(host, str) and host not in ("", "*", "0.0.0.0", "::") else None,
        port_base=port,
        topic=topic if isinstance(topic, str) else "",
        block_size=size if size and size > 0 else 1,
        dp_size=dp if dp and dp > 0 else 1,
    )


async def fetch_server_info(
    session: aiohttp.ClientSession, url: str, *, timeout: float = 5.0
) -> ServerInfo:
    """Ask a backend what it serves and how big it is."""
    t = aiohttp.ClientTimeout(total=timeout)
    base = _base(url)
    info: Any = None
    for path in ("/get_server_info", "/server_info"):
        info = await _get_json(session, base + path, t)
        if info is not None:
            break
    if not isinstance(info, Mapping):
        raise BackendError(f"{base}: no /get_server_info or /server_info")
    name: str | None = None
    served = info.get("served_model_name")
    if isinstance(served, str) and served:
        name = served
    else:
        models = await _get_json(session, base + "/v1/models", t)
        if isinstance(models, Mapping):
            data = models.get("data")
            if isinstance(data, list) and data and isinstance(data[0], Mapping):
                first = data[0].get("id")
                name = first if isinstance(first, str) and first else None
        if name is None:
            for path in ("/get_model_info", "/model_info"):
                mi = await _get_json(session, base + path, t)
                if isinstance(mi, Mapping) and isinstance(mi.get("model_path"), str):
                    name = mi["model_path"]
                    break
    return parse_server_info(info, name)


def parse_load(body: Any) -> BackendLoad | None:
    """Read a `/v1/loads` body (dict with `loads`) or a `/get_load` body (list or {"load": n})."""
    if isinstance(body, Mapping) and isinstance(body.get("loads"), list):
        running = waiting = used = cap = 0
        rates: list[float] = []
        for entry in body["loads"]:
            if not isinstance(entry, Mapping):
                return None
            running += _int(entry.get("num_running_reqs")) or 0
            waiting += _int(entry.get("num_waiting_reqs")) or 0
            used += _int(entry.get("num_used_tokens")) or 0
            cap += _int(entry.get("max_total_num_tokens")) or 0
            rate = entry.get("cache_hit_rate")
            if isinstance(rate, int | float) and not isinstance(rate, bool):
                rates.append(float(rate))
        return BackendLoad(
            running=running,
            waiting=waiting,
            used_tokens=used,
            max_total_num_tokens=cap or None,
            cache_hit_rate=sum(rates) / len(rates) if rates else None,
        )
    if isinstance(body, list):
        reqs = waiting = tokens = 0
        for entry in body:
            if not isinstance(entry, Mapping):
                return None
            reqs += _int(entry.get("num_reqs")) or 0
            waiting += _int(entry.get("num_waiting_reqs")) or 0
            tokens += _int(entry.get("num_tokens")) or 0
        return BackendLoad(running=max(reqs - waiting, 0), waiting=waiting, used_tokens=tokens)
    if isinstance(body, Mapping) and _int(body.get("load")) is not None:
        return BackendLoad(running=_int(body.get("load")) or 0, waiting=0)
    return None


async def fetch_load(
    session: aiohttp.ClientSession, url: str, *, timeout: float = 2.0
) -> BackendLoad:
    """The backend's current load: `/v1/loads`, or `/get_load` on older SGLang."""
    t = aiohttp.ClientTimeout(total=timeout)
    base = _base(url)
    for path in ("/v1/loads", "/get_load"):
        body = await _get_json(session, base + path, t)
        if body is None:
            continue
        load = parse_load(body)
        if load is None:
            raise BackendError(f"{base}{path}: unexpected load shape")
        return load
    raise BackendError(f"{base}: neither /v1/loads nor /get_load")


async def check_health(
    session: aiohttp.ClientSession, url: str, timeout: float = 2.0, *, path: str = "/health"
) -> bool:
    """True when the backend answers `path` with 200 within `timeout` seconds."""
    try:
        async with session.get(
            _base(url) + path, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def abort_request(
    session: aiohttp.ClientSession, url: str, rid: str, *, timeout: float = 2.0
) -> bool:
    """Ask the backend to abort request `rid`; True when it answered 200."""
    try:
        async with session.post(
            _base(url) + "/abort_request",
            json={"rid": rid},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


def _is_map(value: Any) -> bool:
    """isinstance(value, Mapping), the common dict and None (an absent key: `meta_info` of
    every OpenAI answer) answered without the ABC machinery."""
    return type(value) is dict or (value is not None and isinstance(value, Mapping))


def cached_tokens_from_openai(obj: Any) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens` of an OpenAI response or chunk."""
    if not _is_map(obj):
        return None
    usage = obj.get("usage")
    if not _is_map(usage):
        return None
    details = usage.get("prompt_tokens_details")
    if not _is_map(details):
        return None
    return _int(details.get("cached_tokens"))


def cached_tokens_from_meta(meta_info: Any) -> int | None:
    """`cached_tokens` of a SGLang `meta_info` (pass the meta_info or the whole body)."""
    if not isinstance(meta_info, Mapping):
        return None
    if "meta_info" in meta_info:
        return cached_tokens_from_meta(meta_info["meta_info"])
    return _int(meta_info.get("cached_tokens"))


def _sse_payload(chunk: str | bytes | Mapping[str, Any]) -> Any:
    if type(chunk) is dict or isinstance(chunk, Mapping):
        return chunk
    text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
    data_lines = [line[5:].lstrip() for line in text.splitlines() if line.startswith("data:")]
    payload = "\n".join(data_lines) if data_lines else text.strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return None


def usage_from_sse_chunk(chunk: str | bytes | Mapping[str, Any]) -> TokenUsage | None:
    """Token counts in one stream event (`data: {...}` text, bytes, or the decoded object).

    `/generate` chunks carry cumulative counts in `meta_info`; OpenAI chunks carry `usage` only
    on the final usage chunk (or on every chunk with SGLang's continuous usage stats).
    Returns None for `[DONE]`, comments, non-JSON, and chunks with no counts.
    """
    obj = _sse_payload(chunk)
    if not _is_map(obj):
        return None
    meta = obj.get("meta_info")
    if _is_map(meta):
        return TokenUsage(
            prompt_tokens=_int(meta.get("prompt_tokens")),
            completion_tokens=_int(meta.get("completion_tokens")),
            cached_tokens=_int(meta.get("cached_tokens")),
            finished=meta.get("finish_reason") is not None,
        )
    finished = False
    choices = obj.get("choices")
    if isinstance(choices, list):
        finished = any(_is_map(c) and c.get("finish_reason") is not None for c in choices)
    usage = obj.get("usage")
    if _is_map(usage):
        return TokenUsage(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            cached_tokens=cached_tokens_from_openai(obj),
            finished=finished,
        )
    if finished:
        return TokenUsage(finished=True)
    return None
