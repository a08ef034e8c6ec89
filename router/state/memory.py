"""Shared state without a server: the single-replica default, and an in-process bus.

`LocalState` is what a router runs with when no `--state` is given: one replica, nothing to
share. Publishing is dropped, reading waits and returns nothing, and `remote` is False so
`StateSync` starts no task at all.

`MemoryBus` connects several `MemoryState`s in one process (tests, and simulations of several
replicas): each published event is appended to every *other* member's inbox, in order. A
member reads only what was published after it joined, like a Redis reader anchored at the
stream's end. `bus.down = True` makes every call raise `StateUnavailable` (and wakes blocked
readers so they raise too), so outage handling can be tested without a Redis server; events
published while down are lost, as they would be. Heartbeats expire on an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence

from router.state.events import Event
from router.state.protocol import Endpoint, StateUnavailable, new_replica_id

__all__ = ["LocalState", "MemoryBus", "MemoryState", "new_replica_id"]


class LocalState(Endpoint):
    """One replica alone: nothing is shared (the default)."""

    REMOTE = False

    def __init__(self, *, replica: str | None = None, cluster: str = "default") -> None:
        super().__init__(replica=replica, cluster=cluster)
        self._closed = asyncio.Event()

    async def publish(self, events: Sequence[Event]) -> None:
        return None

    async def read(self, timeout_s: float) -> Sequence[Event]:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
        # races the inner wait's completion, and stop() would then wait for ever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._closed.wait()
        return ()

    async def heartbeat(self, ttl_s: float) -> None:
        return None

    async def replicas(self) -> Sequence[str]:
        return (self._replica,)

    async def close(self) -> None:
        self._closed.set()


class MemoryBus:
    """Several replicas' `MemoryState`s in one process (module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._members: dict[str, MemoryState] = {}
        self._alive: dict[str, float] = {}  # replica -> heartbeat expiry on `clock`
        self._down = False

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        if value:
            for member in self._members.values():
                member._wake.set()

    def join(self, *, replica: str | None = None, cluster: str = "default") -> MemoryState:
        """A new member; its reads start with the next event published."""
        member = MemoryState(self, replica=replica, cluster=cluster)
        if member.replica in self._members:
            raise ValueError(f"replica {member.replica!r} already joined this bus")
        self._members[member.replica] = member
        return member

    def _check(self) -> None:
        if self._down:
            raise StateUnavailable("memory bus is down")

    def _publish(self, sender: str, events: Sequence[Event]) -> None:
        self._check()
        for replica, member in self._members.items():
            if replica != sender:
                member._inbox.extend(events)
                member._wake.set()

    def _leave(self, replica: str) -> None:
        self._members.pop(replica, None)
        self._alive.pop(replica, None)


class MemoryState(Endpoint):
    """One replica's end of a `MemoryBus`."""

    def __init__(self, bus: MemoryBus, *, replica: str | None, cluster: str) -> None:
        super().__init__(replica=replica, cluster=cluster)
        self._bus = bus
        self._inbox: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._closed = False

    async def publish(self, events: Sequence[Event]) -> None:
        self._bus._publish(self._replica, events)

    async def read(self, timeout_s: float) -> Sequence[Event]:
        self._bus._check()
        if not self._inbox and not self._closed:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            self._bus._check()
        out = [e for e in self._inbox if e.replica != self._replica]
        self._inbox.clear()
        return out

    async def heartbeat(self, ttl_s: float) -> None:
        self._bus._check()
        self._bus._alive[self._replica] = self._bus.clock() + ttl_s

    async def replicas(self) -> Sequence[str]:
        self._bus._check()
        now = self._bus.clock()
        return sorted(r for r, expiry in self._bus._alive.items() if expiry > now)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._bus._leave(self._replica)
