"""Shared helpers for the state tests: one replica's routing core and sync, and its prompts.

`test_state_sync.py` (in-process bus, fake clock) and `test_state_redis.py` (real
redis-server, the loop's clock) drive two replicas the same way; only where a replica's time
comes from differs, so `SyncedReplica` leaves `now()` to each test's subclass.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from router.core.model import BackendSpec, RouteRequest
from router.core.policies import make_policy
from router.core.routing import Decision, RoutingCore
from router.state import StateSync

__all__ = ["SyncedReplica", "make_core", "prompt"]


@dataclass
class SyncedReplica:
    """A replica's core and sync: routes and ends requests as the proxy would report them."""

    core: RoutingCore
    sync: StateSync

    def now(self) -> float:
        raise NotImplementedError

    def route(self, req: RouteRequest, exclude: tuple[str, ...] = ()) -> Decision:
        decision = self.core.route(req, self.now(), exclude=exclude)
        rec = self.core.record(req.rid)
        assert rec is not None
        self.sync.routed(rec)
        return decision

    def finish(self, rid: str) -> None:
        rec = self.core.record(rid)
        assert rec is not None
        self.core.on_finished(rid, self.now(), 10)
        self.sync.ended(rec)


def make_core() -> RoutingCore:
    """The real cost policy over two empty backends, "a" and "b" (ties go to "a")."""
    specs = [BackendSpec(id=b, kv_capacity_tokens=500_000) for b in ("a", "b")]
    return RoutingCore(make_policy("cost", rng=random.Random(0)), specs)


def prompt(rid: str, seed: int, extra: tuple[int, ...] = ()) -> RouteRequest:
    """An 8k-token prompt (128 blocks of 64) of random chained hashes, plus `extra` blocks."""
    rng = random.Random(seed)
    hashes = tuple(rng.getrandbits(64) - (1 << 63) for _ in range(128)) + extra
    return RouteRequest(
        rid=rid, blocks=hashes, block_tokens=64, prompt_tokens=64 * len(hashes), max_tokens=16
    )
