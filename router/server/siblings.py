"""One router answering as a whole when it runs as several worker processes.

With `serve --workers N` the kernel hands each connection to one of N processes
(SO_REUSEPORT), so a request for `/stats`, `/metrics` or an `/admin/backends` change reaches
one worker only. Each worker also listens on a private control socket (a Unix socket in the
supervisor's runtime folder, `config.worker_sockets[i]`), and the worker that got the public
request asks its siblings there:

- `/stats`: every worker's body is fetched and merged: per-backend counts summed, in-flight
  summed, health true only if every worker sees the backend healthy, the shared-state link's
  counts summed (`connected` only if every worker is), the rest (core, KV events, scheduler)
  as the first worker has it, and each worker's own body under `"workers"` (with its index
  and pid) for what does not add up (learned speeds, queues);
- `/metrics`: the Prometheus texts are parsed and merged sample by sample: counters and
  histograms summed, in-flight gauges summed, health the minimum, replicas the maximum, hit
  ratios recomputed from the summed token counters, other gauges (learned speeds) averaged;
  `prefix_router_workers` says how many workers answered;
- `POST`/`DELETE /admin/backends...`: applied here, then replayed with the same body and
  credentials to every sibling, so the pool stays the same in every worker;
  `X-Prefix-Router-Workers: applied/N` says how many took it.

A request that arrives on a control socket is answered by that worker alone (that is how the
siblings are asked, and a way to look at one worker). A sibling that does not answer within
`timeout_s` is left out and counted in `workers_missing`; the merged answer is still given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from router.server.config import ServerConfig

__all__ = ["Siblings", "merge_metrics", "merge_stats"]

log = logging.getLogger("router.server.siblings")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SUMMED_GAUGES = ("prefix_router_in_flight", "prefix_router_backend_in_flight")
_RATIOS = {  # ratio gauge -> (numerator counter, denominator counter), summed over workers
    "prefix_router_predicted_hit_ratio": (
        "prefix_router_predicted_cached_tokens_total",
        "prefix_router_prompt_tokens_total",
    ),
    "prefix_router_hit_ratio": (
        "prefix_router_cached_tokens_total",
        "prefix_router_prompt_tokens_total",
    ),
}
_BACKEND_SUMS = (
    "load",
    "routed",
    "prompt_tokens",
    "predicted_cached_tokens",
    "reported_cached_tokens",
)
_FORWARDED_HEADERS = ("Authorization", "Content-Type", "X-Api-Key")


def _is_control(request: web.Request) -> bool:
    """Whether `request` came over a Unix control socket (a sibling or an operator asking)."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


def _combine(name: str, typ: str, values: list[float]) -> float:
    if typ != "gauge" or name in _SUMMED_GAUGES:
        return sum(values)
    if name == "prefix_router_backend_healthy":
        return min(values)
    if name == "prefix_router_replicas":
        return max(values)
    return sum(values) / len(values)


def merge_metrics(texts: Iterable[str]) -> str:
    """Several workers' Prometheus texts as one router's (module docstring)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    answered = 0
    for text in texts:
        answered += 1
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            slot = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                slot.setdefault(key, []).append(float(sample.value))
    totals: dict[str, float] = {}  # per sample name, over every label set (the ratios' parts)
    for by_key in values.values():
        for (sample_name, _labels), vals in by_key.items():
            totals[sample_name] = totals.get(sample_name, 0.0) + sum(vals)
    for name, family in families.items():
        for (sample_name, labels), vals in values[name].items():
            value = _combine(sample_name, family.type, vals)
            if sample_name in _RATIOS:
                num, den = (totals.get(k, 0.0) for k in _RATIOS[sample_name])
                value = num / den if den > 0 else value
            family.add_sample(sample_name, dict(labels), value)
    workers = Metric("prefix_router_workers", "Router worker processes that answered.", "gauge")
    workers.add_sample("prefix_router_workers", {}, float(answered))
    families[workers.name] = workers

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()


def merge_stats(bodies: list[dict[str, Any]], missing: int = 0) -> dict[str, Any]:
    """Several workers' /stats bodies as one router's (module docstring); the first leads."""
    first = bodies[0]
    merged_backends: dict[str, dict[str, Any]] = {}
    for body in bodies:
        for row in body.get("backends") or []:
            url = row.get("url")
            have = merged_backends.get(url)
            if have is None:
                merged_backends[url] = dict(row)
                continue
            for key in _BACKEND_SUMS:
                if isinstance(row.get(key), int) and isinstance(have.get(key), int):
                    have[key] += row[key]
            have["healthy"] = bool(have.get("healthy")) and bool(row.get("healthy"))
    lead = {k: v for k, v in first.items() if k not in ("worker", "pid")}
    return {
        **lead,  # what does not add up (core, kv_events, scheduler) as the first worker has it
        "in_flight": sum(int(b.get("in_flight") or 0) for b in bodies),
        "asyncio_tasks": sum(int(b.get("asyncio_tasks") or 0) for b in bodies),
        "backends": list(merged_backends.values()),
        "replicas": _merge_sync([b.get("replicas") for b in bodies]),
        "worker_count": len(bodies) + missing,
        "workers_missing": missing,
        "workers": bodies,
    }


def _merge_sync(syncs: list[Any]) -> Any:
    """The shared-state link of all workers: the first's, with its counts summed."""
    found = [s for s in syncs if isinstance(s, dict)]
    if not found:
        return None
    merged = dict(found[0])
    for key, value in found[0].items():
        if isinstance(value, int) and not isinstance(value, bool):
            merged[key] = sum(int(s.get(key) or 0) for s in found)
    merged["connected"] = all(bool(s.get("connected")) for s in found)
    return merged


class Siblings:
    """Asks the other workers over their control sockets (module docstring)."""

    def __init__(self, sockets: list[str], index: int, *, timeout_s: float = 3.0) -> None:
        if not 0 <= index < len(sockets):
            raise ValueError(f"worker index {index} outside {len(sockets)} worker sockets")
        self.sockets = sockets
        self.index = index
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    @classmethod
    def of(cls, config: ServerConfig) -> Siblings | None:
        """The siblings of a worker of `serve --workers N`; None for a lone router."""
        if config.worker_index is None or len(config.worker_sockets) < 2:
            return None
        return cls(config.worker_sockets, config.worker_index)

    @property
    def others(self) -> list[str]:
        return [path for k, path in enumerate(self.sockets) if k != self.index]

    async def _ask(
        self, path: str, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes] | None:
        try:
            connector = aiohttp.UnixConnector(path=path)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session,
                session.request(method, "http://worker" + url, headers=headers, data=body) as resp,
            ):
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.warning("worker at %s did not answer %s %s: %r", path, method, url, err)
            return None

    async def _ask_all(
        self, request: web.Request, body: bytes | None
    ) -> list[tuple[int, bytes] | None]:
        headers = {k: request.headers[k] for k in _FORWARDED_HEADERS if k in request.headers}
        asks = [
            self._ask(path, request.method, request.path_qs, headers, body) for path in self.others
        ]
        return list(await asyncio.gather(*asks))

    def _tag(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"worker": self.index, "pid": os.getpid(), **body}

    async def stats(
        self, request: web.Request, local: Callable[[], dict[str, Any]]
    ) -> web.StreamResponse:
        """/stats: every worker's body merged (this worker's alone on a control socket)."""
        own = self._tag(local())
        if _is_control(request):
            return web.json_response(own, dumps=lambda o: json.dumps(o, default=repr))
        answers = await self._ask_all(request, None)
        bodies = [own]
        for answer in answers:
            if answer is not None and answer[0] == 200:
                bodies.append(json.loads(answer[1]))
        bodies.sort(key=lambda b: int(b.get("worker", 0)))
        merged = merge_stats(bodies, missing=len(answers) + 1 - len(bodies))
        return web.json_response(merged, dumps=lambda o: json.dumps(o, default=repr))

    async def metrics(self, request: web.Request, local: Handler) -> web.StreamResponse:
        """/metrics: this worker's text merged with the siblings'."""
        own = await local(request)
        if _is_control(request) or not isinstance(own, web.Response) or own.status != 200:
            return own
        answers = await self._ask_all(request, None)
        texts = [own.body.decode()] if isinstance(own.body, bytes) else []
        texts += [a[1].decode() for a in answers if a is not None and a[0] == 200]
        return web.Response(
            text=merge_metrics(texts),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Prometheus-Format": "0.0.4"},
        )

    async def fan_out(self, request: web.Request, local: Handler) -> web.StreamResponse:
        """An admin change: applied here, then replayed to every sibling."""
        control = _is_control(request)
        body = await request.read() if request.can_read_body else None
        own = await local(request)
        if control or own.status >= 400:
            return own
        answers = await self._ask_all(request, body)
        applied = 1 + sum(1 for a in answers if a is not None and a[0] < 400)
        if applied < len(self.sockets):
            log.warning(
                "%s %s applied by %d of %d workers",
                request.method,
                request.path,
                applied,
                len(self.sockets),
            )
        own.headers["X-Prefix-Router-Workers"] = f"{applied}/{len(self.sockets)}"
        return own
