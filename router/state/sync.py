"""StateSync: a router replica's link to the others, between its RoutingCore and a SharedState.

Outgoing: the proxy calls `routed(rec)`, `first_token(rec)` and `ended(rec)` beside the core's
own events. Each call only appends to an outbox (no await, no I/O on the request path); a
publisher task sends the outbox in batches. While the store is unreachable the outbox keeps
at most `outbox_max` events (oldest dropped), and anything older than `stale_s` when it can
finally be sent is dropped: another replica would apply it at receipt, as if just queued.

Incoming: a consumer task reads the other replicas' events and calls the policy's remote hooks
with the rid prefixed by the sender's replica id (`f"{replica}/{rid}"`, unique across
replicas) and `now` from this replica's clock (the same `loop.time()` the proxy gives the
core). An event is applied when it arrives, not at its sender's timestamp: hosts' clocks
disagree, the delay is a few milliseconds of Redis round trip, and the policy's backlog model
counts from the moment work is known to be queued, which for this replica is now.

    replica A proxy --routed(rec)--> outbox --XADD--> Redis stream --XREAD--> replica B
                                                         B: policy.on_remote_routed(backend,
                                                            RouteRequest(rid="A/<rid>"), now)

Remote requests are remembered until their Ended arrives, so that they can be ended anyway
when their sender disappears (its heartbeat key expired for `replica_ttl_s`) or after
`remote_ttl_s` (an Ended lost in an outage): the policy's queue model must not keep phantom
work forever.

Failures: every store error is caught here. The first one of an outage is logged once
(warning), the loops back off exponentially (`backoff_min_s` to `backoff_max_s`) and retry,
and the recovery is logged once (info, with the outage's length). Routing never waits on the
store: during an outage each replica routes on its local state alone. A policy hook that
raises is logged and counted, never fatal: a bad event must not stop a router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from router.core.model import RequestRecord
from router.core.routing import RoutingCore
from router.state.events import Ended, Event, FirstToken, Routed, remote_rid
from router.state.protocol import SharedState, StateUnavailable

__all__ = ["StateSync", "SyncConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncConfig:
    """Timings of the sync loops; defaults suit a LAN Redis and requests of seconds to minutes."""

    read_timeout_s: float = 1.0  # one XREAD BLOCK (also bounds how long stop() waits)
    heartbeat_s: float = 2.0
    replica_ttl_s: float = 10.0  # a replica silent this long is gone; its requests end
    remote_ttl_s: float = 900.0  # a remote request with no Ended after this is dropped
    outbox_max: int = 10_000
    publish_batch: int = 256
    stale_s: float = 5.0  # unsent events older than this are dropped, not sent late
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0
    # wait this long after the first queued event before sending, so one write carries the
    # events of many requests (the worker processes of one router: serve --workers N)
    linger_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("read_timeout_s", "heartbeat_s", "backoff_min_s", "stale_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.replica_ttl_s <= self.heartbeat_s:
            raise ValueError("replica_ttl_s must exceed heartbeat_s")
        if self.remote_ttl_s <= 0 or self.outbox_max <= 0 or self.publish_batch <= 0:
            raise ValueError("remote_ttl_s, outbox_max and publish_batch must be positive")
        if self.linger_s < 0:
            raise ValueError("linger_s must not be negative")
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must be at least backoff_min_s")


@dataclass(slots=True)
class _Remote:
    replica: str
    backend: str
    since: float


class StateSync:
    """Publishes this replica's routing events and applies the others' (module docstring)."""

    def __init__(
        self,
        core: RoutingCore,
        shared: SharedState,
        config: SyncConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.shared = shared
        self.config = config or SyncConfig()
        self._clock = clock
        self._wall = wall
        self._outbox: deque[tuple[float, Event]] = deque()
        self._retry: list[tuple[float, Event]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._remote: dict[str, _Remote] = {}
        self._replicas: tuple[str, ...] = ()
        self.connected = True
        self._down_since: float | None = None
        self.outages = 0
        self.published = 0
        self.dropped = 0
        self.received = 0
        self.applied = 0
        self.hook_errors = 0
        self.last_error: str | None = None

    @property
    def replica(self) -> str:
        return self.shared.replica

    @property
    def enabled(self) -> bool:
        """False for the single-replica default: nothing is published or started."""
        return self.shared.remote

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- outgoing (the proxy's calls; synchronous, no I/O) --------------------------------

    def routed(self, rec: RequestRecord) -> None:
        """The core just routed `rec` (call after `core.route`, with `core.record(rid)`)."""
        if not self.enabled:
            return
        req = rec.request
        self._enqueue(
            Routed(
                replica=self.replica,
                rid=req.rid,
                backend=rec.backend,
                blocks=req.blocks,
                block_tokens=req.block_tokens,
                prompt_tokens=req.prompt_tokens,
                max_tokens=req.max_tokens,
                t=self._wall(),
            )
        )

    def first_token(self, rec: RequestRecord) -> None:
        """`rec`'s first token came back (call beside `core.on_first_token`)."""
        if self.enabled:
            self._enqueue(
                FirstToken(
                    replica=self.replica, rid=rec.request.rid, backend=rec.backend, t=self._wall()
                )
            )

    def ended(self, rec: RequestRecord) -> None:
        """`rec` finished or failed (call beside `core.on_finished` / `core.on_failed`)."""
        if self.enabled:
            self._enqueue(
                Ended(
                    replica=self.replica, rid=rec.request.rid, backend=rec.backend, t=self._wall()
                )
            )

    def _enqueue(self, event: Event) -> None:
        if len(self._outbox) >= self.config.outbox_max:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append((self._now(), event))
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the publish, consume and heartbeat loops (nothing for a single replica)."""
        if self._tasks:
            raise RuntimeError("StateSync already started")
        if not self.enabled:
            return
        loops: list[Callable[[], Coroutine[Any, Any, None]]] = [
            self._publish_loop,
            self._consume_loop,
            self._heartbeat_loop,
        ]
        self._tasks = [asyncio.create_task(loop(), name=f"state-{loop.__name__}") for loop in loops]
        log.info("state sync: replica %s in cluster %s", self.shared.replica, self.shared.cluster)

    async def stop(self) -> None:
        """Send what is queued (briefly), stop the loops and close the store."""
        tasks, self._tasks = self._tasks, []
        pending = set(tasks)
        while pending:  # again if a task swallowed its cancellation (a library's race)
            for task in pending:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=1.0)
        if tasks and self.connected and (self._outbox or self._retry):
            with contextlib.suppress(StateUnavailable, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._flush()
        await self.shared.close()

    # -- failures -------------------------------------------------------------------------

    def _failed(self, err: Exception) -> None:
        self.last_error = str(err)
        if self.connected:
            self.connected = False
            self.outages += 1
            self._down_since = self._now()
            log.warning(
                "shared state unreachable (%s); routing on local state until it returns", err
            )

    def _recovered(self) -> None:
        if not self.connected:
            self.connected = True
            since = self._down_since if self._down_since is not None else self._now()
            log.info("shared state reachable again after %.1f s", self._now() - since)
            self._down_since = None

    async def _run_forever(self, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        backoff = self.config.backoff_min_s
        while True:
            try:
                await step()
            except StateUnavailable as err:
                self._failed(err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
                continue
            backoff = self.config.backoff_min_s

    # -- the loops ------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        await self._run_forever(self._publish_step)

    async def _publish_step(self) -> None:
        if not self._outbox and not self._retry:
            self._wake.clear()
            await self._wake.wait()
        if self.config.linger_s:
            await asyncio.sleep(self.config.linger_s)
        await self._flush()

    async def _flush(self) -> None:
        while self._outbox or self._retry:
            if not self._retry:
                take = min(len(self._outbox), self.config.publish_batch)
                self._retry = [self._outbox.popleft() for _ in range(take)]
            oldest = self._now() - self.config.stale_s
            fresh = [item for item in self._retry if item[0] >= oldest]
            self.dropped += len(self._retry) - len(fresh)
            self._retry = fresh
            if fresh:
                await self.shared.publish([event for _, event in fresh])
                self._recovered()
                self.published += len(fresh)
            self._retry = []

    async def _consume_loop(self) -> None:
        await self._run_forever(self._consume_step)

    async def _consume_step(self) -> None:
        events = await self.shared.read(self.config.read_timeout_s)
        self._recovered()
        for event in events:
            self.apply(event)

    async def _heartbeat_loop(self) -> None:
        await self._run_forever(self._heartbeat_step)

    async def _heartbeat_step(self) -> None:
        await self.shared.heartbeat(self.config.replica_ttl_s)
        self._replicas = tuple(await self.shared.replicas())
        self._recovered()
        self.sweep(alive=self._replicas)
        await asyncio.sleep(self.config.heartbeat_s)

    # -- applying other replicas' events ---------------------------------------------------

    def apply(self, event: Event) -> None:
        """Feed one remote event to the policy's hooks at this replica's `now`."""
        if event.replica == self.replica:
            return  # our own: the policy saw it through the core already
        self.received += 1
        now = self._now()
        policy = self.core.policy
        rid = remote_rid(event.replica, event.rid)
        try:
            if isinstance(event, Routed):
                req = event.request()
                self._remote[rid] = _Remote(event.replica, event.backend, now)
                policy.on_remote_routed(event.backend, req, now)
            elif isinstance(event, FirstToken):
                policy.on_remote_first_token(event.backend, rid, now)
            else:
                self._remote.pop(rid, None)
                policy.on_remote_ended(event.backend, rid, now)
        except Exception:
            self.hook_errors += 1
            if self.hook_errors == 1:
                log.exception("policy %r failed on a remote event; skipping", policy.name)
            return
        self.applied += 1

    def sweep(self, *, alive: tuple[str, ...] | None = None) -> int:
        """End remote requests whose replica is gone or that outlived `remote_ttl_s`.

        `alive` is the replicas whose heartbeat is current (None: do not judge by it). A
        request counts as orphaned only if it arrived at least `replica_ttl_s` ago, so one
        routed by a replica whose first heartbeat we have not listed yet is kept.
        """
        now = self._now()
        alive_set = set(alive) if alive is not None else None
        ended = 0
        for rid, remote in list(self._remote.items()):
            age = now - remote.since
            gone = (
                alive_set is not None
                and remote.replica not in alive_set
                and age >= self.config.replica_ttl_s
            )
            if gone or age >= self.config.remote_ttl_s:
                del self._remote[rid]
                ended += 1
                try:
                    self.core.policy.on_remote_ended(remote.backend, rid, now)
                except Exception:
                    self.hook_errors += 1
        return ended

    # -- reporting ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot for /stats."""
        remote = Counter(r.backend for r in self._remote.values())
        return {
            "enabled": self.enabled,
            "replica": self.shared.replica,
            "cluster": self.shared.cluster,
            "connected": self.connected,
            "replicas": list(self._replicas) if self.enabled else [self.shared.replica],
            "outages": self.outages,
            "last_error": self.last_error,
            "published": self.published,
            "dropped": self.dropped,
            "queued": len(self._outbox) + len(self._retry),
            "received": self.received,
            "applied": self.applied,
            "malformed": self.shared.malformed,
            "hook_errors": self.hook_errors,
            "remote_in_flight": dict(sorted(remote.items())),
        }
