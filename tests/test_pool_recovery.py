"""The backend pool tells its listeners when a backend becomes routable again (real HTTP:
a simulated server that goes away and comes back on the same port)."""

from __future__ import annotations

import aiohttp

from backends.sim.server import start_sim_servers
from router.core.policies import make_policy
from router.core.routing import RoutingCore
from router.server.pool import BackendPool


async def test_a_backend_that_recovers_is_announced_once() -> None:
    [sim] = await start_sim_servers(1, speedup=20.0)
    port, url = sim.port, sim.url
    core = RoutingCore(make_policy("round_robin"), [])
    async with aiohttp.ClientSession() as session:
        pool = BackendPool(
            core,
            session,
            health_interval_s=60.0,
            health_timeout_s=1.0,
            breaker_failures=1,
            breaker_cooldown_s=0.0,
        )
        announced: list[int] = []
        pool.on_routable.append(lambda: announced.append(len(announced)))
        entry = pool.add(url)
        try:
            await pool.check(entry, 0.0)  # discovered, then healthy: routable
            assert entry.healthy and announced == [0]
            await pool.check(entry, 1.0)  # still healthy: nothing new to say
            assert announced == [0]
            await sim.close()
            await pool.check(entry, 2.0)
            assert not entry.healthy and announced == [0]
            [sim] = await start_sim_servers(1, speedup=20.0, base_port=port)
            await pool.check(entry, 3.0)  # the breaker's cooldown is over: it probes, recovers
            assert entry.healthy and announced == [0, 1]
            assert pool.drain(url, True) and pool.drain(url, False)  # undrained: routable again
            assert announced == [0, 1, 2]
            assert pool.drain(url, False) and announced == [0, 1, 2]  # was not draining
        finally:
            await sim.close()
