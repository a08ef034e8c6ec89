"""The backend pool: discovery, health checks and a circuit breaker per backend.

Each backend URL becomes a `PoolEntry`. Its life::

    added --discover ok--> in the routing core, health unknown (not routable)
          --health ok----> breaker CLOSED: healthy, routable
    CLOSED --N failures (or one refused connection)--> OPEN: unhealthy, no traffic
    OPEN --cooldown elapsed--> HALF_OPEN: the health loop sends one probe
    HALF_OPEN --probe ok--> CLOSED          --probe fails--> OPEN (cooldown restarts)

Discovery (`backends.sglang.fetch_server_info`) reads `/get_server_info` (or `/server_info`)
for the KV capacity (`max_total_num_tokens`), page size, served model name and HiCache host
pool; a backend that cannot be reached yet stays out of the routing core and is retried every
health interval. Its `BackendSpec` also carries the routing prior of its performance profile
(`router.priors`; the profile comes from `profile_for(url)`, i.e. `--profile` or a per-backend
override): so a policy that models speed starts from what the operator said the hardware is.
The host pool is what the server reports (`enable_hierarchical_cache`, `hicache_ratio`,
`hicache_size`); a server that says nothing about it gets the profile's.

Failures come from two places: the health loop (`GET /health`) and the proxy
(`report_failure` on a refused connection or a 5xx before the first byte). Each healthy round
also reads the backend's own load (`/v1/loads` or `/get_load`) into the core. The breaker itself
is sans-clock: the caller passes `now` (the event loop's clock).

Draining keeps a backend's in-flight requests running but routes nothing new to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from backends.sglang import BackendError, ServerInfo, check_health, fetch_load, fetch_server_info
from backends.sim.perf import get_profile
from router.core.model import BackendSpec
from router.core.routing import RoutingCore
from router.priors import prior_from_profile
from router.server.config import DEFAULT_PROFILE

__all__ = [
    "BackendInfo",
    "BackendPool",
    "BreakerState",
    "CircuitBreaker",
    "PoolEntry",
    "PoolObserver",
    "host_cache_tokens",
]

log = logging.getLogger("router.server.pool")


class PoolObserver(Protocol):
    """Hears of each backend discovery (with what it said) and removal."""

    def discovered(self, backend_id: str, url: str, server: ServerInfo) -> None: ...

    def removed(self, backend_id: str) -> None: ...


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
    profile: str = ""  # the performance profile its routing prior came from
    host_cache_tokens: int = 0  # HiCache host pool


def host_cache_tokens(server: ServerInfo, profile_name: str) -> int:
    """The host pool the server reports, else (server silent on HiCache) the profile's."""
    profile = get_profile(profile_name)
    reported = server.host_cache_tokens(profile.kv_bytes_per_token())
    return profile.host_capacity_tokens if reported is None else reported


@dataclass(slots=True, kw_only=True)
class PoolEntry:
    url: str
    breaker: CircuitBreaker
    profile: str | None = None  # set when added with its own profile (admin API)
    info: BackendInfo | None = None
    draining: bool = False
    healthy: bool = False  # last verdict pushed into the routing core
    last_error: str | None = None
    checks: int = 0

    @property
    def id(self) -> str:
        return self.url

    @property
    def discovered(self) -> bool:
        return self.info is not None


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
        profile_for: Callable[[str], str] | None = None,
    ) -> None:
        self.core = core
        self.profile_for = profile_for
        self.session = session
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.entries: dict[str, PoolEntry] = {}
        # told of each discovery and removal (the KV event subscriptions, router/server/kv_events)
        self.observers: list[PoolObserver] = []
        # called when a backend becomes routable (healthy again, or no longer draining)
        self.on_routable: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ----- membership -------------------------------------------------------------------

    def add(self, url: str, *, profile: str | None = None) -> PoolEntry:
        """Add a backend (idempotent); it becomes routable after discovery and a health check.

        `profile` names its performance profile (KeyError if unknown); None: `profile_for`'s.
        """
        url = url.rstrip("/")
        if url in self.entries:
            return self.entries[url]
        if profile is not None:
            get_profile(profile)
        entry = PoolEntry(
            url=url,
            breaker=CircuitBreaker(self.breaker_failures, self.breaker_cooldown_s),
            profile=profile,
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
        for observer in self.observers:
            observer.removed(entry.id)
        return True

    def drain(self, url: str, draining: bool = True) -> bool:
        entry = self.entries.get(url.rstrip("/"))
        if entry is None:
            return False
        was_draining, entry.draining = entry.draining, draining
        if entry.discovered:
            self.core.set_draining(entry.id, draining)
            if was_draining and not draining and entry.healthy:
                self._routable_again()
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

    def unfit(self, model: str) -> set[str] | None:
        """Ids of discovered backends that do not serve `model` (one pass per request);
        None when no backend serves it though some name their models; empty when none do."""
        named = serves = False
        out: set[str] = set()
        for e in self.entries.values():
            models = e.info.models if e.info else ()
            if models:
                named = True
            if model in models:
                serves = True
            elif e.discovered:
                out.add(e.id)
        if not named:
            return set()
        return out if serves else None

    def any_healthy(self) -> bool:
        return any(e.healthy and not e.draining for e in self.entries.values())

    # ----- health -----------------------------------------------------------------------

    def _set_healthy(self, entry: PoolEntry, healthy: bool) -> None:
        if entry.healthy != healthy:
            log.info("backend %s is now %s", entry.url, "healthy" if healthy else "unhealthy")
        entry.healthy = healthy
        if entry.discovered and entry.url in self.entries:
            changed = self.core.set_healthy(entry.id, healthy)
            if changed and healthy and not entry.draining:
                self._routable_again()

    def _routable_again(self) -> None:
        for callback in self.on_routable:
            callback()

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
            server = await fetch_server_info(self.session, entry.url, timeout=self.health_timeout_s)
        except (BackendError, ValueError) as exc:
            entry.last_error = f"discovery failed: {exc}"
            return False
        if entry.url not in self.entries:
            return False
        models = [server.model]
        if server.model_path and server.model_path != server.model:
            models.append(server.model_path)
        profile = self._profile_of(entry)
        info = BackendInfo(
            models=tuple(models),
            kv_capacity_tokens=server.max_total_num_tokens or None,
            page_size=server.page_size,
            max_running_requests=server.max_running_requests or None,
            profile=profile,
            host_cache_tokens=host_cache_tokens(server, profile),
        )
        entry.info = info
        spec = BackendSpec(
            id=entry.id,
            kv_capacity_tokens=info.kv_capacity_tokens,
            host_cache_tokens=info.host_cache_tokens,
            page_size=info.page_size,
            prior=prior_from_profile(get_profile(profile)),
            max_running_requests=info.max_running_requests,
        )
        self.core.add_backend(spec)
        self.core.set_healthy(entry.id, False)
        if entry.draining:
            self.core.set_draining(entry.id, True)
        for observer in self.observers:
            observer.discovered(entry.id, entry.url, server)
        log.info(
            "backend %s discovered: models=%s kv=%s host=%s page=%s profile=%s",
            entry.url,
            list(info.models),
            info.kv_capacity_tokens,
            info.host_cache_tokens,
            info.page_size,
            profile,
        )
        return True

    def _profile_of(self, entry: PoolEntry) -> str:
        if entry.profile is not None:
            return entry.profile
        if self.profile_for is not None:
            return self.profile_for(entry.url)
        return DEFAULT_PROFILE

    async def check(self, entry: PoolEntry, now: float) -> None:
        """One health round for one backend: discover if needed, then GET /health."""
        entry.checks += 1
        if not entry.discovered and not await self._discover(entry):
            self._set_healthy(entry, False)
            return
        if not entry.breaker.may_probe(now):
            return
        ok = await check_health(self.session, entry.url, self.health_timeout_s)
        reason = "health check failed"
        if ok:
            entry.breaker.record_success()
            entry.last_error = None
            self._set_healthy(entry, True)
            await self._poll_load(entry)
        else:
            entry.last_error = reason
            entry.breaker.record_failure(now, trip=entry.breaker.state is BreakerState.HALF_OPEN)
            if not entry.breaker.closed:
                self._set_healthy(entry, False)

    async def _poll_load(self, entry: PoolEntry) -> None:
        """The backend's own running/waiting counts, for policies that read them."""
        try:
            load = await fetch_load(self.session, entry.url, timeout=self.health_timeout_s)
        except BackendError:
            return
        if entry.url in self.entries:
            self.core.set_reported_load(entry.id, load.running, load.waiting)

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
