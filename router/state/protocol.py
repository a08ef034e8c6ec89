"""The `SharedState` protocol: how a replica's events reach the others.

A transport does three things and knows nothing about routing:

- `publish(events)`: send this replica's events (a batch: one round trip for many);
- `read(timeout_s)`: the next batch of *other* replicas' events, in the order they were
  published, waiting at most `timeout_s`; the first call starts at "now" (history is never
  replayed: a request routed before this replica started is not worth applying late);
- `heartbeat(ttl_s)` / `replicas()`: announce this replica for `ttl_s` seconds, and list the
  replicas whose announcement is current (for /stats, and to forget a dead replica's requests).

Any failure to reach the shared store raises `StateUnavailable`; the caller (`StateSync`)
backs off and retries, and the transport reconnects on its own on the next call. A transport
never raises for one malformed event: it skips it and counts it in `malformed`.

`remote` says whether other replicas can exist at all: the single-replica default
(`LocalState`) is False, and `StateSync` then starts nothing and publishes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from router.state.events import Event

__all__ = ["SharedState", "StateUnavailable"]


class StateUnavailable(ConnectionError):
    """The shared store cannot be reached now (the caller retries later)."""


@runtime_checkable
class SharedState(Protocol):
    """One replica's end of the shared event stream (module docstring)."""

    @property
    def replica(self) -> str: ...

    @property
    def cluster(self) -> str: ...

    @property
    def remote(self) -> bool: ...

    @property
    def malformed(self) -> int: ...

    async def publish(self, events: Sequence[Event]) -> None: ...

    async def read(self, timeout_s: float) -> Sequence[Event]: ...

    async def heartbeat(self, ttl_s: float) -> None: ...

    async def replicas(self) -> Sequence[str]: ...

    async def close(self) -> None: ...
