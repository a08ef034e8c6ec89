"""Operations endpoints: /health, /readiness, /stats (JSON) and /metrics (Prometheus).

- `/health` answers 200 while the router's event loop runs: it says nothing about backends.
- `/readiness` is 503 until at least one backend is healthy and not draining, so a load
  balancer in front of several routers only sends traffic to one that can serve it.
- `/stats` is the per-backend picture: URL, health, circuit, load as the router counts it and
  as the backend reports it, requests routed, predicted vs reported cached tokens, and the
  learned prefill/decode speeds when the policy exposes them (`policy.learned`, optional),
  and under "replicas" the shared-state link (`StateSync.stats()`: this replica's id, the
  replicas alive, connected or not, events published / applied / dropped).
- In PD mode (`serve --prefill/--decode`) the backends above are the prefill pool, with the
  counts its own routing core kept; `decode` holds the decode pool's rows the same way, and
  `/readiness` wants a healthy server in each pool (a request needs one of each).
- `/metrics` refreshes the live gauges (health, in-flight, learned speeds, replicas seen,
  remote events applied) and renders the registry. None of these carry prompt text; /stats
  and /metrics do show backend URLs and errors, so `--protect-status` puts them behind a key
  (`auth.check_status`, applied in `app.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from router.core.model import BackendState, Policy
from router.core.routing import RoutingCore
from router.server.admin import describe_entry
from router.server.metrics import RouterMetrics
from router.server.pool import BackendPool
from router.state import StateSync

__all__ = ["PoolView", "StatusApi", "learned_all"]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def learned_all(policy: Policy) -> dict[str, Any]:
    """What the policy has learned per backend (PP/TG), if it exposes `learned()` or `learned`."""
    learned = getattr(policy, "learned", None)
    if callable(learned):
        learned = learned()
    if not isinstance(learned, Mapping):
        return {}
    return {str(k): _plain(v) for k, v in learned.items()}


def _number(obj: Any, *names: str) -> float | None:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class PoolView:
    """A second pool's core and health (PD mode's decode servers) for /stats and /readiness."""

    core: RoutingCore
    pool: BackendPool


def _ready(pool: BackendPool) -> int:
    return sum(1 for e in pool.entries.values() if e.healthy and not e.draining)


class StatusApi:
    def __init__(
        self,
        core: RoutingCore,
        policy: Policy,
        pool: BackendPool,
        metrics: RouterMetrics,
        policy_name: str,
        *,
        sync: StateSync,
    ) -> None:
        self.sync = sync
        self.core = core
        self.policy = policy
        self.pool = pool
        self.metrics = metrics
        self.policy_name = policy_name
        self.kv_events: Any = None  # the KV event subscriptions, when the app has them
        self.scheduler_stats: Callable[[], Any] | None = None  # set with --scheduler on
        self.decode: PoolView | None = None  # set in PD mode: the decode pool
        self.pd_stats: Callable[[], Any] | None = None  # set in PD mode: the pair's hold
        metrics.registry.collectors.append(self._collect)

    def _states(self) -> dict[str, BackendState]:
        return {b.id: b for b in self.core.backends()}

    def _collect(self) -> None:
        states = self._states()
        m = self.metrics
        m.backend_healthy.clear()
        m.backend_in_flight.clear()
        m.learned_pp.clear()
        m.learned_tg.clear()
        replicas = self.sync.stats()["replicas"]
        m.replicas.set(value=float(max(1, len(replicas))))
        m.remote_events.set_total(value=float(self.sync.applied))
        learned_by_backend = learned_all(self.policy)
        entries = list(self.pool.entries.values())
        if self.decode is not None:
            states.update((b.id, b) for b in self.decode.core.backends())
            learned_by_backend.update(learned_all(self.decode.core.policy))
            entries += self.decode.pool.entries.values()
        for entry in entries:
            m.backend_healthy.set(entry.id, value=1.0 if entry.healthy else 0.0)
            state = states.get(entry.id)
            m.backend_in_flight.set(entry.id, value=float(state.load if state else 0))
            learned = learned_by_backend.get(entry.id)
            pp = _number(learned, "prefill_tokens_per_s", "pp_tokens_per_s")
            tg = _number(learned, "decode_step_s", "tg_step_s")
            if pp is not None:
                m.learned_pp.set(entry.id, value=pp)
            if tg is not None:
                m.learned_tg.set(entry.id, value=tg)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readiness(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = {"healthy_backends": _ready(self.pool)}
        ready = body["healthy_backends"] > 0
        if self.decode is not None:
            body["healthy_decode_backends"] = _ready(self.decode.pool)
            ready = ready and body["healthy_decode_backends"] > 0
        if ready:
            return web.json_response({"status": "ready", **body})
        return web.json_response(
            {"status": "not ready", **body}, status=503, headers={"Retry-After": "1"}
        )

    def _rows(
        self, core: RoutingCore, pool: BackendPool, policy: Policy, counts: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """One row per pool entry; `counts`: per-backend counters (empty: the proxy's metrics)."""
        states = {b.id: b for b in core.backends()}
        m = self.metrics
        learned_by_backend = learned_all(policy)
        rows: list[dict[str, Any]] = []
        for entry in pool.entries.values():
            state = states.get(entry.id)
            row = describe_entry(entry)
            own = counts.get(entry.id)
            row.update(
                load=state.load if state else 0,
                reported_running=state.reported_running if state else None,
                reported_waiting=state.reported_waiting if state else None,
                learned=learned_by_backend.get(entry.id),
            )
            if own is None:
                row.update(
                    routed=int(m.routed.get(entry.id)),
                    prompt_tokens=int(m.prompt_tokens.get(entry.id)),
                    predicted_cached_tokens=int(m.predicted_cached.get(entry.id)),
                    reported_cached_tokens=int(m.reported_cached.get(entry.id)),
                )
            else:  # PD's prefill pool: the proxy's metrics are keyed by the decode server
                row.update(
                    routed=own["routed"],
                    prompt_tokens=own["prompt_tokens_reported"],
                    predicted_cached_tokens=own["predicted_cached_tokens_reported"],
                    reported_cached_tokens=own["reported_cached_tokens"],
                )
            rows.append(row)
        return rows

    def stats_body(self) -> dict[str, Any]:
        m = self.metrics
        core_stats: Any = None
        stats: Callable[[], Any] | None = getattr(self.core, "stats", None)
        if stats is not None:
            core_stats = _plain(stats())
        decode: dict[str, Any] | None = None
        counts: Mapping[str, Any] = {}
        if self.decode is not None:
            counts = self.core.stats()["backends"]
            dcore = self.decode.core
            decode = {
                "policy": dcore.policy.name,
                "backends": self._rows(dcore, self.decode.pool, dcore.policy, {}),
                "core": _plain(dcore.stats()),
            }
        return {
            "policy": self.policy_name,
            "in_flight": int(m.in_flight.get()),
            # the loop's task count: a leak shows as growth at rest (benchmarks/soak.py)
            "asyncio_tasks": len(asyncio.all_tasks()),
            "backends": self._rows(self.core, self.pool, self.policy, counts),
            "core": core_stats,
            "decode": decode,
            "replicas": self.sync.stats(),
            "kv_events": self.kv_events.stats() if self.kv_events is not None else None,
            "scheduler": self.scheduler_stats() if self.scheduler_stats is not None else None,
            "pd": self.pd_stats() if self.pd_stats is not None else None,
        }

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats_body(), dumps=lambda o: json.dumps(o, default=repr))

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=self.metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Prometheus-Format": "0.0.4"},
        )
