"""`serve --scheduler on`: the core's Scheduler driven from the event loop's clock.

The proxy hands each new request to `SchedulerDriver.bind`, which submits a Ticket and waits
for the step that binds it (a `Decision`, exactly what `RoutingCore.route` returns) or sheds
it (an `ApiError` 429, or 503 when no backend is up, with `Retry-After`, raised before any
backend work). The proxy calls `kick()` after every first token and every ending it feeds the
core; the driver also steps on each arrival and at the scheduler's own `wake_at` (one
`loop.call_at` timer). No scheduling logic lives here: only clocks, futures and headers.

What a request may say about itself:
- priority: header `X-Priority` or the body's `priority` (SGLang's field), an integer,
  higher first;
- tenant: header `X-Tenant`, else the API key it authenticated with (kept as a short hash,
  never the key), else one shared tenant;
- TTFT deadline: header `X-TTFT-SLO` (seconds), else the deployment's `--slo-ttft`.

A client that disconnects while waiting is taken out of the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from router.core.model import RouteRequest
from router.core.routing import Decision
from router.core.scheduler import (
    Scheduler,
    SchedulerConfig,
    Shed,
    Ticket,
    headroom_knobs,
    retry_after_header,
)
from router.server.auth import bearer_token
from router.server.config import ServerConfig
from router.server.errors import ApiError
from router.server.metrics import TTFT_BUCKETS, Counter, Gauge, Histogram, RouterMetrics

__all__ = ["SchedulerDriver", "scheduler_config", "ticket_for"]

PRIORITY_HEADER = "X-Priority"
TENANT_HEADER = "X-Tenant"
DEADLINE_HEADER = "X-TTFT-SLO"


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    """The scheduler's knobs from the server's configuration (`serve --scheduler on`)."""
    return SchedulerConfig(
        budget_s=config.scheduler_budget_s,
        **headroom_knobs(config.scheduler_headroom),
        engine_priority=config.scheduler_engine_priority,
        reserve=config.scheduler_reserve,
        isolation=config.scheduler_isolation,
        slo_ttft_s=config.slo_ttft_s,
        max_queue=config.queue_size,
        queue_timeout_s=config.queue_timeout_s,
    )


def _int_or_400(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ApiError(400, f"{where} must be an integer", param="priority", code="invalid_type")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(
            400, f"{where} must be an integer", param="priority", code="invalid_type"
        ) from None


def ticket_for(
    request: web.Request, body: Mapping[str, Any], route_req: RouteRequest, now: float
) -> Ticket:
    """The Ticket of one HTTP request (module docstring); bad values are a 400."""
    priority = 0
    header = request.headers.get(PRIORITY_HEADER)
    if header is not None:
        priority = _int_or_400(header.strip(), f"header {PRIORITY_HEADER}")
    elif body.get("priority") is not None:
        priority = _int_or_400(body["priority"], "priority")
    tenant = request.headers.get(TENANT_HEADER, "").strip()[:128]
    if not tenant:
        key = bearer_token(request)
        if key:
            tenant = "key:" + hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    deadline: float | None = None
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is not None:
        try:
            deadline = float(raw)
        except ValueError:
            deadline = math.nan
        if not (deadline > 0 and math.isfinite(deadline)):
            raise ApiError(
                400,
                f"header {DEADLINE_HEADER} must be a positive number of seconds",
                code="invalid_value",
            )
    return Ticket(req=route_req, arrival=now, priority=priority, tenant=tenant, deadline_s=deadline)


class SchedulerDriver:
    """Futures for waiting requests, one wake-up timer, and the scheduler's metrics."""

    def __init__(self, scheduler: Scheduler, metrics: RouterMetrics) -> None:
        self.scheduler = scheduler
        self._waiters: dict[str, asyncio.Future[Decision]] = {}
        # bound requests' `priority` for the engine (--scheduler-engine-priority), until taken
        self._priorities: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        r = metrics.registry
        self.waiting = r.register(
            Gauge("prefix_router_scheduler_waiting", "Requests waiting in the router's queue.")
        )
        self.shed = r.register(
            Counter(
                "prefix_router_scheduler_shed_total",
                "Requests refused by the scheduler (queue_full, slo, timeout, no_backend).",
                ("reason",),
            )
        )
        self.bound = r.register(
            Counter("prefix_router_scheduler_bound_total", "Requests the scheduler bound.")
        )
        self.wait = r.register(
            Histogram(
                "prefix_router_scheduler_wait_seconds",
                "Time requests waited in the router before being bound.",
                (),
                TTFT_BUCKETS,
            )
        )
        r.collectors.append(self._collect)

    @classmethod
    def build(cls, core: Any, config: SchedulerConfig, metrics: RouterMetrics) -> SchedulerDriver:
        return cls(Scheduler(core, config), metrics)

    def _collect(self) -> None:
        self.waiting.set(value=float(len(self.scheduler)))

    async def bind(self, ticket: Ticket) -> Decision:
        """Wait until `ticket` is bound (its Decision) or shed (ApiError 429/503)."""
        loop = asyncio.get_running_loop()
        rid = ticket.req.rid
        refused = self.scheduler.submit(ticket, loop.time())
        if refused is not None:
            self._count_shed(refused)
            raise _shed_error(refused)
        future: asyncio.Future[Decision] = loop.create_future()
        self._waiters[rid] = future
        self.kick()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Bound in the same tick the client left: end it, no one will send it.
                self.scheduler.core.on_failed(rid, loop.time())
            else:
                self.scheduler.cancel(rid)
            self._priorities.pop(rid, None)
            raise
        finally:
            self._waiters.pop(rid, None)

    def engine_priority(self, rid: str) -> int | None:
        """The `priority` to send the backend with a request just bound (None: none)."""
        return self._priorities.pop(rid, None)

    def kick(self) -> None:
        """Step the scheduler now: resolve what it bound or shed, re-arm the timer."""
        if not len(self.scheduler) and not self._waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        out = self.scheduler.step(now)
        for item in out.bound:
            self.bound.inc()
            self.wait.observe(value=item.waited_s)
            future = self._waiters.get(item.ticket.req.rid)
            if future is not None and not future.done():
                if item.engine_priority is not None:
                    self._priorities[item.ticket.req.rid] = item.engine_priority
                future.set_result(item.decision)
        for shed in out.shed:
            self._count_shed(shed)
            future = self._waiters.get(shed.ticket.req.rid)
            if future is not None and not future.done():
                future.set_exception(_shed_error(shed))
        self._arm(out.wake_at, loop)

    def _arm(self, wake_at: float | None, loop: asyncio.AbstractEventLoop) -> None:
        if wake_at is None:
            return
        if self._timer is not None and not self._timer.cancelled() and self._timer_at <= wake_at:
            return  # an earlier wake-up is already set; it will re-arm
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake_at
        self._timer = loop.call_at(wake_at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.kick()

    def _count_shed(self, shed: Shed) -> None:
        self.shed.inc(shed.reason)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stats(self) -> dict[str, Any]:
        out = self.scheduler.stats()
        out["wait_seconds_count"] = self.wait.count()
        return out


def _shed_error(shed: Shed) -> ApiError:
    status = 503 if shed.reason == "no_backend" else 429
    code = "no_healthy_backend" if status == 503 else f"router_{shed.reason}"
    return ApiError(
        status, shed.message, code=code, headers={"Retry-After": retry_after_header(shed)}
    )
