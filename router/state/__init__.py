"""Where shared routing state lives: in memory (default) or Redis (several replicas).

Several router replicas behind one load balancer each run their own `RoutingCore`. To route as
one router would, each tells the others what it routed where (`events.py`: Routed, FirstToken,
Ended) through a `SharedState` transport (`protocol.py`): `LocalState` alone (the default),
`MemoryBus` in one process (`memory.py`), or a Redis stream (`redis.py`). `StateSync`
(`sync.py`) sits between the proxy and the transport: the proxy reports its own requests, and
the other replicas' requests reach the policy through its remote hooks. See docs/replicas.md.

`open_state(url, cluster=..., replica=...)` builds the transport named by ``--state``:
None, "" or "memory" -> LocalState; redis://, rediss:// or unix:// URLs -> RedisState;
hub+unix:///path -> HubState (the worker processes of one `serve --workers N`, `hub.py`).
"""

from __future__ import annotations

from router.state.events import Ended, Event, EventError, FirstToken, Routed, remote_rid
from router.state.hub import HUB_SCHEME, HubServer, HubState
from router.state.memory import LocalState, MemoryBus, MemoryState, new_replica_id
from router.state.protocol import SharedState, StateUnavailable
from router.state.sync import StateSync, SyncConfig

__all__ = [
    "Ended",
    "Event",
    "EventError",
    "FirstToken",
    "HubServer",
    "HubState",
    "LocalState",
    "MemoryBus",
    "MemoryState",
    "Routed",
    "SharedState",
    "StateSync",
    "StateUnavailable",
    "SyncConfig",
    "new_replica_id",
    "open_state",
    "remote_rid",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_state(
    url: str | None, *, cluster: str = "default", replica: str | None = None
) -> SharedState:
    """The transport for ``--state URL`` (module docstring); ValueError for an unknown one."""
    if not url or url == "memory":
        return LocalState(replica=replica, cluster=cluster)
    if url.startswith(_REDIS_SCHEMES):
        from router.state.redis import RedisState  # imports redis.asyncio only when used

        return RedisState(url, cluster=cluster, replica=replica)
    if url.startswith(HUB_SCHEME):
        return HubState(url, cluster=cluster, replica=replica)
    raise ValueError(
        f"--state must be 'memory' or a redis://, rediss:// or unix:// URL, got {url!r}"
    )
