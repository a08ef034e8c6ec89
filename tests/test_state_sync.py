"""StateSync over the in-process bus: two cost-policy replicas that route as one.

Each replica is a real RoutingCore with the real cost policy; the sync runs its real loops on
this test's event loop. Time given to the cores and the syncs is a shared fake clock, so
backlogs do not drain while the test waits for a task to run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from state_fixtures import SyncedReplica, make_core, prompt

from router.state import LocalState, MemoryBus, StateSync, SyncConfig
from router.state.events import Ended, Routed

FAST = SyncConfig(
    read_timeout_s=0.05,
    heartbeat_s=0.05,
    replica_ttl_s=0.5,
    backoff_min_s=0.01,
    backoff_max_s=0.05,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Replica(SyncedReplica):
    clock: Clock

    def now(self) -> float:
        return self.clock()


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[MemoryBus, Replica, Replica]]:
    clock = Clock()
    bus = MemoryBus(clock=clock)
    replicas = []
    for name in ("r1", "r2"):
        core = make_core()
        sync = StateSync(core, bus.join(replica=name), FAST, clock=clock)
        replicas.append(Replica(core, sync, clock))
    for r in replicas:
        await r.sync.start()
    yield bus, replicas[0], replicas[1]
    for r in replicas:
        await r.sync.stop()


async def test_remote_prefix_is_predicted_cached(pair: tuple[MemoryBus, Replica, Replica]) -> None:
    _bus, r1, r2 = pair
    # Alone, r2 would break the tie toward "a"; r1 sends the prefix to "b".
    assert r1.route(prompt("x", seed=1), exclude=("a",)).backend == "b"
    await until(lambda: r2.sync.applied == 1)
    assert r2.sync.stats()["remote_in_flight"] == {"b": 1}
    r1.clock.t += 2.0  # the prefill is long done
    follow_up = prompt("x2", seed=1, extra=(42, 43))
    decision = r2.route(follow_up)
    assert decision.backend == "b"
    assert decision.predicted_cached_tokens == 128 * 64
    await until(lambda: r1.sync.received == 1)  # r2's Routed, not r1's own
    assert r1.sync.stats()["remote_in_flight"] == {"b": 1}


async def test_remote_queue_counts_until_ended(pair: tuple[MemoryBus, Replica, Replica]) -> None:
    _bus, r1, r2 = pair
    assert r1.route(prompt("y", seed=2)).backend == "a"
    await until(lambda: r2.sync.applied == 1)
    # a has 8k tokens of r1's prefill queued: an unrelated prompt goes to idle b.
    probe = r2.core.route(prompt("z1", seed=3), r2.clock())
    assert probe.backend == "b"
    r2.core.on_failed("z1", r2.clock())
    r1.finish("y")
    await until(lambda: r2.sync.applied == 2)
    assert r2.sync.stats()["remote_in_flight"] == {}
    # Freed: with the clock unchanged, a is as idle as b again and wins the tie.
    assert r2.core.route(prompt("z2", seed=4), r2.clock()).backend == "a"


async def test_own_events_are_ignored(pair: tuple[MemoryBus, Replica, Replica]) -> None:
    _bus, r1, _r2 = pair
    own = Routed(
        replica="r1", rid="q", backend="a", blocks=(1, 2), block_tokens=64, prompt_tokens=100, t=0.0
    )
    r1.sync.apply(own)
    r1.sync.apply(Ended(replica="r1", rid="q", backend="a", t=0.0))
    assert (r1.sync.received, r1.sync.applied) == (0, 0)
    assert r1.sync.stats()["remote_in_flight"] == {}


async def test_outage_routing_continues_and_sync_recovers(
    pair: tuple[MemoryBus, Replica, Replica], caplog: pytest.LogCaptureFixture
) -> None:
    bus, r1, r2 = pair
    caplog.set_level(logging.INFO, logger="router.state.sync")
    bus.down = True
    await until(lambda: not r1.sync.connected and not r2.sync.connected)
    for i in range(5):  # routing goes on, on local state alone
        r1.route(prompt(f"o{i}", seed=10 + i))
        r1.finish(f"o{i}")
    await asyncio.sleep(0.2)  # several failed retries: still one warning per replica
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and r1.sync.outages == 1
    r1.clock.t += 10.0  # the events queued during the outage are stale now
    bus.down = False
    await until(lambda: r1.sync.connected and r2.sync.connected)
    r1.route(prompt("after", seed=99))
    await until(lambda: r2.sync.applied >= 1)
    assert r2.sync.stats()["remote_in_flight"] == {"a": 1}
    assert r1.sync.dropped == 10  # 5 Routed + 5 Ended, too old to send
    assert any("reachable again" in r.message for r in caplog.records)


async def test_a_vanished_replica_has_its_requests_ended(
    pair: tuple[MemoryBus, Replica, Replica],
) -> None:
    _bus, r1, r2 = pair
    r1.route(prompt("w", seed=5))
    await until(lambda: r2.sync.applied == 1)
    await until(lambda: set(r2.sync.stats()["replicas"]) == {"r1", "r2"})
    await r1.sync.stop()  # leaves the bus: no heartbeat, and no Ended for "w"
    r2.clock.t += 1.0  # past replica_ttl_s
    await until(lambda: r2.sync.stats()["remote_in_flight"] == {})
    assert r2.sync.stats()["replicas"] == ["r2"]
    # And a's queue is free again: the tie goes back to a.
    assert r2.core.route(prompt("v", seed=6), r2.clock()).backend == "a"


async def test_single_replica_default_does_nothing() -> None:
    core = make_core()
    sync = StateSync(core, LocalState(replica="solo"))
    await sync.start()
    core.route(prompt("s", seed=1), 0.0)
    rec = core.record("s")
    assert rec is not None
    sync.routed(rec)
    sync.ended(rec)
    stats = sync.stats()
    assert stats["enabled"] is False and stats["queued"] == 0
    assert stats["replicas"] == ["solo"]
    await sync.stop()


async def test_a_failing_policy_hook_is_logged_not_fatal(
    pair: tuple[MemoryBus, Replica, Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    _bus, r1, r2 = pair

    def boom(*_args: object) -> None:
        raise RuntimeError("policy bug")

    monkeypatch.setattr(r2.core.policy, "on_remote_routed", boom)
    r1.route(prompt("p1", seed=7))
    r1.route(prompt("p2", seed=8))
    await until(lambda: r2.sync.received == 2)
    assert r2.sync.hook_errors == 2 and r2.sync.applied == 0
    r1.finish("p1")
    await until(lambda: r2.sync.applied == 1)  # the loop is still running
