"""The simulated engine's radix cache: matching, n-1 cap, locks, LRU eviction, host tier."""

from __future__ import annotations

import random

from backends.sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored
from backends.sim.radix import RadixCache, RadixNode


def put(cache: RadixCache, units: list[int], now: float, size: int = 10) -> None:
    """Compute a prompt into the cache the way the engine does (reserve, release, insert)."""
    total = size * len(units)
    assert cache.make_room(total)
    cache.reserve(total)
    cache.release(total)
    cache.insert(units, [size] * len(units), now)
    cache.check()


def test_match_returns_shared_prefix_and_caps_full_match_at_n_minus_1() -> None:
    cache = RadixCache(1000)
    put(cache, [1, 2, 3], now=1.0)
    m = cache.match([1, 2, 9, 10], [10, 10, 10, 10])
    assert (m.device_units, m.device_tokens, m.host_tokens) == (2, 20, 0)
    full = cache.match([1, 2, 3], [10, 10, 10])
    assert (full.device_units, full.device_tokens) == (2, 20)  # last unit recomputed
    longer = cache.match([1, 2, 3, 4], [10, 10, 10, 5])
    assert longer.device_tokens == 30
    assert cache.match([7], [10]).tokens == 0


def test_partial_unit_matches_only_its_tokens_and_grows_on_insert() -> None:
    cache = RadixCache(1000)
    cache.reserve(15)
    cache.release(15)
    cache.insert([1, 2], [10, 5], now=0.0)
    m = cache.match([1, 2, 3], [10, 10, 10])
    assert m.device_tokens == 15 and m.device_units == 2
    cache.reserve(5)
    cache.release(5)
    res = cache.insert([1, 2, 3], [10, 10, 10], now=1.0)
    assert res.stored_tokens == 15  # 5 of growth + the new unit
    cache.check()
    assert cache.device_tokens == 30


def test_probe_does_not_touch_lru_but_match_with_time_does() -> None:
    cache = RadixCache(40)
    put(cache, [1, 2], now=1.0)
    put(cache, [3, 4], now=2.0)
    cache.match([1, 2, 5], [10, 10, 10])  # probe: no touch
    assert cache.evict(10) == 10
    assert cache.match([1, 2, 5], [10, 10, 10]).tokens == 10  # leaf 2 went first
    cache.match([1, 5], [10, 10], now=3.0)  # touch unit 1
    cache.evict(10)
    assert cache.match([3, 4, 5], [10, 10, 10]).tokens == 10  # then leaf 4, not unit 1
    assert cache.match([1, 5], [10, 10]).tokens == 10
    cache.check()


def test_eviction_removes_lru_unlocked_leaves_only() -> None:
    cache = RadixCache(60)
    put(cache, [1, 2], now=1.0)  # oldest
    put(cache, [3, 4], now=2.0)
    put(cache, [5, 6], now=3.0)
    locked = cache.match([1, 2, 99], [10, 10, 10], now=None)
    cache.lock(locked.last_node)
    assert cache.protected_tokens == 20 and cache.evictable_tokens == 40
    assert cache.evict(30) == 30  # 4, then 3 (now a leaf), then 6; never 1 or 2
    assert cache.match([1, 2, 99], [10, 10, 10]).tokens == 20
    assert cache.match([3, 99], [10, 10]).tokens == 0
    assert cache.match([5, 6, 99], [10, 10, 10]).tokens == 10
    assert cache.evict(100) == 10  # only unit 5 is left to evict
    assert cache.device_tokens == 20
    cache.unlock(locked.last_node)
    assert cache.evict(100) == 20
    assert cache.device_tokens == 0 and len(cache) == 0
    cache.check()


def test_reserved_tokens_limit_room() -> None:
    cache = RadixCache(50)
    put(cache, [1, 2, 3], now=0.0)
    cache.reserve(20)
    assert not cache.make_room(40)  # 30 evictable + 0 free... only 30 can be freed
    assert cache.make_room(30)
    assert cache.available_tokens == 30


def test_host_tier_keeps_evicted_units_and_load_host_brings_them_back() -> None:
    cache = RadixCache(40, host_capacity_tokens=40, record_events=True)
    put(cache, [1, 2], now=1.0)
    put(cache, [3, 4], now=2.0)
    cache.take_events()
    assert cache.evict(20) == 20  # unit 2 then unit 1 move to the host
    m = cache.match([1, 2, 5], [10, 10, 10])
    assert (m.device_tokens, m.host_tokens, m.host_units) == (0, 20, 2)
    events = cache.take_events()
    assert BlockRemoved(block_hashes=(2,), medium="GPU") in events
    assert any(isinstance(e, BlockStored) and e.medium == "CPU" for e in events)
    cache.lock(m.last_node)
    assert cache.make_room(m.host_tokens)
    assert cache.load_host(m) == 20
    again = cache.match([1, 2, 5], [10, 10, 10])
    assert (again.device_tokens, again.host_tokens) == (20, 0)
    assert cache.protected_tokens == 20 and cache.host_tokens == 0
    cache.unlock(m.last_node)
    cache.check()


def test_host_pool_is_lru_and_full_host_drops_units() -> None:
    cache = RadixCache(20, host_capacity_tokens=20)
    put(cache, [1, 2], now=1.0)
    put(cache, [3, 4], now=2.0)  # evicts 2, 1 to host
    put(cache, [5, 6], now=3.0)  # evicts 4, 3 to host: host drops 2, 1 (LRU)
    assert cache.host_tokens == 20
    assert cache.match([1, 9], [10, 10]).tokens == 0
    assert cache.match([3, 4, 9], [10, 10, 10]).host_tokens == 20
    cache.check()


def test_reset_refused_while_locked_and_emits_cleared() -> None:
    cache = RadixCache(100, record_events=True)
    put(cache, [1, 2], now=0.0)
    m = cache.match([1, 2, 3], [10, 10, 10])
    cache.lock(m.last_node)
    assert not cache.reset()
    cache.unlock(m.last_node)
    cache.take_events()
    assert cache.reset()
    assert cache.take_events() == [AllBlocksCleared()]
    assert cache.device_tokens == 0 and len(cache) == 0


def test_random_operations_keep_accounting_consistent() -> None:
    rng = random.Random(7)
    cache = RadixCache(400, host_capacity_tokens=300)
    held: list[RadixNode] = []
    for step in range(2000):
        depth = rng.randint(1, 6)
        branch = rng.randint(0, 5)
        units = [branch * 100 + d * 10 + rng.randint(0, 1) for d in range(depth)]
        # chained ids: make each id depend on the whole prefix
        chain = [hash(tuple(units[: i + 1])) for i in range(depth)]
        sizes = [rng.randint(1, 16) for _ in chain]
        m = cache.match(chain, sizes, now=float(step))
        op = rng.random()
        if op < 0.5:
            cache.lock(m.last_node)
            need = m.host_load_tokens + sum(sizes) - m.tokens
            if cache.make_room(need):
                cache.load_host(m)
                cache.reserve(sum(sizes) - m.tokens)
                cache.release(sum(sizes) - m.tokens)
                res = cache.insert(chain, sizes, float(step))
                cache.lock(res.last_node)
                held.append(res.last_node)
            cache.unlock(m.last_node)
        elif held:
            cache.unlock(held.pop(rng.randrange(len(held))))
        cache.check()
    for node in held:
        cache.unlock(node)
    cache.check()
    assert cache.protected_tokens == 0
