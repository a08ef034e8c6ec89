"""The backend pool: discovery, health checks and a circuit breaker per backend.

Each backend URL becomes a `PoolEntry`. Its life::

    added --discover ok--> in the routing core, health unknown (not routable)
          --health ok----> breaker CLOSED: healthy, routable
    CLOSED --N failures (or one refused connection)--> OPEN: unhealthy, no traffic
    OPEN --cooldown elapsed--> HALF_OPEN: the health loop sends one probe
    HALF_OPEN --probe ok--> CLOSED          --probe fails--> OPEN (cooldown restarts)

Discovery reads `/get_server_info` (or `/server_info`) for the KV capacity
(`max_total_num_tokens`) and page size, and `/v1/models` for the served model names; a backend
that cannot be reached yet stays out of the routing core and is retried every health
interval. Failures come from two places: the health loop (`GET /health`) and the proxy
(`report_failure` on a refused connection or a 5xx before the first byte). The breaker itself
is sans-clock: the caller passes `now` (the event loop's clock).

Draining keeps a backend's in-flight requests running but routes nothing new to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.core.model import BackendSpec
from router.core.routing import RoutingCore

__all__ = ["BackendInfo", "BackendPool", "BreakerState", "CircuitBreaker", "PoolEntry"]

log = logging.getLogger("router.server.pool")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class CircuitBreaker:
    """Consecutive failures open it; after `cooldown_s` one probe may close it again."""

    failure_threshold: int
    cooldown_s: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0

    def record_failure(self, now: float, *, trip: bool = False) -> bool:
        """Count a failure; `trip` opens at once (connection refused). True if it opened now."""
        self.failures += 1
        if self.state is BreakerState.OPEN:
            return False
        if trip or self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = BreakerState.OPEN
            self.opened_at = now
            return True
        return False

    def may_probe(self, now: float) -> bool:
        """Whether the health loop may probe now (moves OPEN to HALF_OPEN after the cooldown)."""
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = BreakerState.HALF_OPEN
        return self.state is not BreakerState.OPEN

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendInfo:
    """What a backend said about itself at discovery."""

    models: tuple[str, ...]
    kv_capacity_tokens: int | None
    page_size: int
    max_running_requests: int | None = None


@dataclass(slots=True, kw_only=True)
class PoolEntry:
    url: str
    breaker: CircuitBreaker
    info: BackendInfo | None = None
    draining: bool = False
    healthy: bool = False  # last verdict pushed into the routing core
    last_error: str | None = None
    checks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.url

    @property
    def discovered(self) -> bool:
        return self.info is not None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def _get_json(session: aiohttp.ClientSession, url: str, timeout: float) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(
                resp.request_info, resp.history, status=resp.status, message="not 200"
            )
        return await resp.json(content_type=None)


async def discover(session: aiohttp.ClientSession, url: str, timeout: float) -> BackendInfo:
    """Read model names, KV capacity and page size from a backend (SGLang's endpoints)."""
    info: dict[str, Any] = {}
    for path in ("/get_server_info", "/server_info"):
        try:
            got = await _get_json(session, url + path, timeout)
        except aiohttp.ClientResponseError:
            continue
        if isinstance(got, dict):
            info = got
            break
    models: list[str] = []
    try:
        listing = await _get_json(session, url + "/v1/models", timeout)
        for item in listing.get("data", []) if isinstance(listing, dict) else []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                models.append(item["id"])
    except aiohttp.ClientResponseError:
        pass
    for key in ("served_model_name", "model_path"):
        name = info.get(key)
        if isinstance(name, str) and name and name not in models:
            models.append(name)
    return BackendInfo(
        models=tuple(models),
        kv_capacity_tokens=_int_or_none(info.get("max_total_num_tokens")),
        page_size=_int_or_none(info.get("page_size")) or 1,
        max_running_requests=_int_or_none(info.get("max_running_requests")),
    )


class BackendPool:
    """Owns the backend list, keeps the routing core's view of health and draining in step."""

    def __init__(
        self,
        core: RoutingCore,
        session: aiohttp.ClientSession,
        *,
        health_interval_s: float,
        health_timeout_s: float,
        breaker_failures: int,
        breaker_cooldown_s: float,
    ) -> None:
        self.core = core
        self.session = session
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.entries: dict[str, PoolEntry] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ----- membership -------------------------------------------------------------------

    def add(self, url: str) -> PoolEntry:
        """Add a backend (idempotent); it becomes routable after discovery and a health check."""
        url = url.rstrip("/")
        if url in self.entries:
            return self.entries[url]
        entry = PoolEntry(
            url=url, breaker=CircuitBreaker(self.breaker_failures, self.breaker_cooldown_s)
        )
        self.entries[url] = entry
        self._wake.set()
        return entry

    def remove(self, url: str) -> bool:
        """Forget a backend; its in-flight requests finish, nothing new goes there."""
        entry = self.entries.pop(url.rstrip("/"), None)
        if entry is None:
            return False
        if entry.discovered:
            self.core.remove_backend(entry.id)
        return True

    def drain(self, url: str, draining: bool = True) -> bool:
        entry = self.entries.get(url.rstrip("/"))
        if entry is None:
            return False
        entry.draining = draining
        if entry.discovered:
            self.core.set_draining(entry.id, draining)
        return True

    def get(self, url: str) -> PoolEntry | None:
        return self.entries.get(url.rstrip("/"))

    def models(self) -> list[str]:
        seen: list[str] = []
        for entry in self.entries.values():
            for name in entry.info.models if entry.info else ():
                if name not in seen:
                    seen.append(name)
        return seen

    def serving(self, model: str) -> set[str]:
        """Ids of discovered backends that serve `model`."""
        return {e.id for e in self.entries.values() if e.info and model in e.info.models}

    def any_healthy(self) -> bool:
        return any(e.healthy and not e.draining for e in self.entries.values())

    # ----- health -----------------------------------------------------------------------

    def _set_healthy(self, entry: PoolEntry, healthy: bool) -> None:
        if entry.healthy != healthy:
            log.info("backend %s is now %s", entry.url, "healthy" if healthy else "unhealthy")
        entry.healthy = healthy
        if entry.discovered and entry.url in self.entries:
            self.core.set_healthy(entry.id, healthy)

    def report_failure(self, backend_id: str, now: float, reason: str, *, trip: bool) -> None:
        """The proxy saw a backend fail a request; may open its breaker."""
        entry = self.entries.get(backend_id)
        if entry is None:
            return
        entry.last_error = reason
        if entry.breaker.record_failure(now, trip=trip):
            log.warning("backend %s circuit opened: %s", entry.url, reason)
            self._set_healthy(entry, False)
            self._wake.set()

    def report_success(self, backend_id: str) -> None:
        entry = self.entries.get(backend_id)
        if entry is not None and entry.breaker.state is BreakerState.CLOSED:
            entry.breaker.failures = 0

    async def _discover(self, entry: PoolEntry) -> bool:
        try:
            info = await discover(self.session, entry.url, self.health_timeout_s)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            entry.last_error = f"discovery failed: {exc!r}"
            return False
        if entry.url not in self.entries:
            return False
        entry.info = info
        spec = BackendSpec(
            id=entry.id,
            kv_capacity_tokens=info.kv_capacity_tokens,
            page_size=info.page_size,
            max_running_requests=info.max_running_requests,
        )
        self.core.add_backend(spec)
        self.core.set_healthy(entry.id, False)
        if entry.draining:
            self.core.set_draining(entry.id, True)
        log.info(
            "backend %s discovered: models=%s kv=%s page=%s",
            entry.url,
            list(info.models),
            info.kv_capacity_tokens,
            info.page_size,
        )
        return True

    async def check(self, entry: PoolEntry, now: float) -> None:
        """One health round for one backend: discover if needed, then GET /health."""
        entry.checks += 1
        if not entry.discovered and not await self._discover(entry):
            self._set_healthy(entry, False)
            return
        if not entry.breaker.may_probe(now):
            return
        try:
            async with self.session.get(
                entry.url + "/health", timeout=aiohttp.ClientTimeout(total=self.health_timeout_s)
            ) as resp:
                await resp.read()
                ok = resp.status == 200
                reason = f"health status {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"health check failed: {exc!r}"
        if ok:
            entry.breaker.record_success()
            entry.last_error = None
            self._set_healthy(entry, True)
        else:
            entry.last_error = reason
            entry.breaker.record_failure(now, trip=entry.breaker.state is BreakerState.HALF_OPEN)
            if not entry.breaker.closed:
                self._set_healthy(entry, False)

    async def check_all(self) -> None:
        now = asyncio.get_running_loop().time()
        entries: Iterable[PoolEntry] = list(self.entries.values())
        await asyncio.gather(*(self.check(e, now) for e in entries))

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a bug in one round must not stop health checking
                log.exception("health round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.health_interval_s)

    async def start(self) -> None:
        """Run one health round now (so a healthy pool is ready at once), then keep checking."""
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="prefix-router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
