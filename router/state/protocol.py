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

`Endpoint` is the part every transport shares: the validated replica and cluster names (a
random replica id when none is given), `remote` from a class attribute, and no malformed
events (a transport that can receive them overrides `malformed`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from router.state.events import Event, valid_name

__all__ = ["Endpoint", "SharedState", "StateUnavailable", "new_replica_id"]


def new_replica_id() -> str:
    """A random replica id: 12 hex digits, unique enough for one cluster's lifetime."""
    return secrets.token_hex(6)


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


class Endpoint:
    """Names and flags every transport reports the same way (module docstring)."""

    REMOTE: ClassVar[bool] = True

    def __init__(self, *, replica: str | None, cluster: str) -> None:
        self._replica = valid_name(replica or new_replica_id(), "replica")
        self._cluster = valid_name(cluster, "cluster")

    @property
    def replica(self) -> str:
        return self._replica

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def remote(self) -> bool:
        return self.REMOTE

    @property
    def malformed(self) -> int:
        return 0
