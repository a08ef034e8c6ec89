"""The prefix index: matching, LRU eviction modelling, feedback, KV events, memory bound, speed."""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import pytest

from router.core.index import PrefixIndex

TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "conversation_trace.jsonl"


def chain(prefix: int, n: int) -> list[int]:
    return [prefix * 1000 + i for i in range(n)]


def test_match_counts_leading_blocks_per_backend() -> None:
    idx = PrefixIndex()
    for b in ("a", "b", "c"):
        idx.add_backend(b, None, 4)
    idx.insert("a", [1, 2, 3, 4], 0.0, 4)
    idx.insert("b", [1, 2, 9], 0.0, 4)
    idx.insert("c", [7, 8], 0.0, 4)
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert idx.match([1, 2, 9, 4]) == {"a": 2, "b": 3}
    assert idx.match([7, 2]) == {"c": 1}
    assert idx.match([5, 1]) == {}  # a chain is matched from its first block only
    assert idx.match([]) == {}
    assert idx.entries() == 9 and idx.blocks() == 7
    assert idx.held_tokens("a") == 16


def test_capacity_evicts_least_recent_leaves_first() -> None:
    idx = PrefixIndex()
    idx.add_backend("a", 6 * 10, 10)  # room for six blocks
    idx.insert("a", [0, 1, 2, 3], 1.0, 10)  # shared root 0, then branch 1-2-3
    idx.insert("a", [0, 5, 6], 2.0, 10)  # 0 is refreshed by this chain
    assert idx.match([0, 1, 2, 3]) == {"a": 4}
    idx.insert("a", [0, 8], 3.0, 10)  # seven blocks: the oldest leaf (3) goes
    assert idx.match([0, 1, 2, 3]) == {"a": 3}
    assert idx.match([0, 5, 6]) == {"a": 3}
    idx.insert("a", [0, 9, 10], 4.0, 10)  # two more: 2 and 1 go, deepest first
    assert idx.match([0, 1, 2, 3]) == {"a": 1}  # the root is still fresh
    assert idx.match([0, 5, 6]) == {"a": 3}
    assert idx.held_tokens("a") == 60
    assert idx.evicted_capacity == 3


def test_partial_last_block_counts_its_tokens() -> None:
    idx = PrefixIndex()
    idx.add_backend("a", None, 64)
    idx.insert("a", [1, 2, 3], 0.0, 64, prompt_tokens=130)
    assert idx.held_tokens("a") == 64 + 64 + 2


def test_evicting_a_block_unmatches_its_descendants() -> None:
    idx = PrefixIndex()
    idx.add_backend("a", None, 1)
    idx.insert("a", [1, 2, 3, 4], 0.0, 1)
    idx.apply_removed("a", [2])
    assert idx.match([1, 2, 3, 4]) == {"a": 1}


def test_global_bound_evicts_globally_least_recent() -> None:
    idx = PrefixIndex(max_blocks=64)
    for b in ("a", "b"):
        idx.add_backend(b, None, 1)
    for i in range(40):
        idx.insert("a" if i % 2 else "b", chain(i, 3), float(i), 1)
        assert idx.entries() <= 64
    # the newest chains survive on both backends, the oldest are gone
    assert idx.match(chain(39, 3)) == {"a": 3}
    assert idx.match(chain(38, 3)) == {"b": 3}
    assert idx.match(chain(0, 3)) == {}
    assert idx.evicted_global > 0


def test_feedback_confirms_what_it_had_and_forgets_the_shortfall() -> None:
    idx = PrefixIndex()
    idx.add_backend("a", None, 10)
    old = chain(1, 5)
    idx.insert("a", old, 0.0, 10)
    prompt = chain(2, 6)
    idx.insert("a", prompt[:4], 1.0, 10)  # believed: the first four blocks
    # routed believing 40 tokens cached; the backend had only 10
    idx.insert("a", prompt, 2.0, 10)
    idx.observe_cached("a", prompt, 10, 3.0, 10, prompt_tokens=60, predicted_tokens=40)
    # the whole prompt is held now (just prefilled); 30 tokens of the oldest beliefs are gone
    assert idx.match(prompt) == {"a": 6}
    assert idx.match(old) == {"a": 2}
    assert idx.dropped_feedback == 3


def test_feedback_when_the_prompt_is_not_held() -> None:
    idx = PrefixIndex()
    idx.add_backend("a", None, 10)
    prompt = chain(3, 5)
    idx.insert("a", prompt, 0.0, 10)
    idx.observe_cached("a", prompt, 25, 1.0, 10, holds_prompt=False)
    assert idx.match(prompt) == {"a": 2}
    # a full hit (capped at n-1 tokens) confirms every block, re-inserting lost ones
    idx.observe_cached("a", prompt, 49, 2.0, 10, prompt_tokens=50, holds_prompt=False)
    assert idx.match(prompt) == {"a": 5}
    idx.observe_cached("a", prompt, 0, 3.0, 10, holds_prompt=False)
    assert idx.match(prompt) == {}
    with pytest.raises(ValueError):
        idx.observe_cached("a", prompt, -1, 3.0, 10)


def test_kv_events_and_backend_lifecycle() -> None:
    idx = PrefixIndex()
    idx.add_backend("a", None, 16)
    idx.add_backend("b", None, 16)
    idx.apply_stored("a", [1, 2], 0.0)
    idx.apply_stored("b", [1], 0.0)
    assert idx.match([1, 2]) == {"a": 2, "b": 1}
    assert idx.held_tokens("a") == 32
    assert idx.touch("a", [1, 2, 3], 1.0) == 2
    idx.clear_backend("a")
    assert idx.match([1, 2]) == {"b": 1} and idx.held_tokens("a") == 0
    idx.remove_backend("b")
    assert idx.match([1, 2]) == {} and idx.entries() == 0 and idx.blocks() == 0
    idx.add_backend("c", None, 16)  # reuses b's bit without inheriting its beliefs
    assert idx.match([1]) == {}
    idx.insert("c", [1], 0.0, 16)
    assert idx.match([1]) == {"c": 1}
    idx.add_backend("c", 16, 16)  # a capacity learned later applies at once
    assert idx.held_tokens("c") == 16
    with pytest.raises(KeyError, match="unknown backend"):
        idx.insert("zzz", [1], 0.0, 16)
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks=0)


def test_matches_a_brute_force_model_under_random_operations() -> None:
    rng = random.Random(5)
    idx = PrefixIndex()
    names = [f"b{i}" for i in range(5)]
    held: dict[str, set[int]] = {n: set() for n in names}
    for n in names:
        idx.add_backend(n, None, 1)
    prompts = [[0, *chain(p, rng.randrange(1, 6))] for p in range(1, 15)]
    for _ in range(400):
        be, p = rng.choice(names), rng.choice(prompts)
        if rng.random() < 0.7:
            idx.insert(be, p, 0.0, 1)
            held[be].update(p)
        else:
            gone = rng.sample(p, 1)
            idx.apply_removed(be, gone)
            held[be].difference_update(gone)
        q = rng.choice(prompts)
        expect = {}
        for n in names:
            depth = 0
            while depth < len(q) and q[depth] in held[n]:
                depth += 1
            if depth:
                expect[n] = depth
        assert idx.match(q) == expect


class _ReferenceLru:
    """One backend's beliefs as the module docstring states them, one block at a time."""

    def __init__(self) -> None:
        self.lru: OrderedDict[int, tuple[int, int]] = OrderedDict()  # block -> (stamp, size)
        self.stamp = 0

    def refresh(self, blocks: list[int], size: int, last: int) -> None:
        self.stamp += 1
        for i in range(len(blocks) - 1, -1, -1):  # deepest first
            self.lru.pop(blocks[i], None)
            self.lru[blocks[i]] = (self.stamp, last if i == len(blocks) - 1 else size)


def test_refresh_keeps_the_documented_lru_order_stamps_and_sizes() -> None:
    """Chains (with shared roots, repeats and partial last blocks) land deepest first."""
    rng = random.Random(3)
    idx = PrefixIndex()
    idx.add_backend("a", None, 8)
    ref = _ReferenceLru()
    for _ in range(300):
        blocks = chain(rng.randrange(4), rng.randrange(1, 12))
        if rng.random() < 0.2:
            blocks = [rng.randrange(30) for _ in range(rng.randrange(1, 6))]  # repeats too
        prompt = len(blocks) * 8 - rng.randrange(8)
        idx.insert("a", blocks, 0.0, 8, prompt_tokens=prompt)
        ref.refresh(blocks, 8, prompt - (len(blocks) - 1) * 8)
        lru = idx._backends["a"].lru
        assert [(b, v >> 24, v & 0xFFFFFF) for b, v in lru.items()] == [
            (b, stamp, size) for b, (stamp, size) in ref.lru.items()
        ]
        assert idx.held_tokens("a") == sum(size for _, size in ref.lru.values())


def test_one_refresh_shares_its_packed_values() -> None:
    """A chain's full blocks share one packed int (what `approx_bytes` counts per entry)."""
    idx = PrefixIndex()
    idx.add_backend("a", None, 64)
    idx.insert("a", list(range(100)), 0.0, 64, prompt_tokens=99 * 64 + 10)
    values = list(idx._backends["a"].lru.values())
    assert len({id(v) for v in values}) == 2  # the full blocks' and the partial last block's
    assert idx.held_tokens("a") == 99 * 64 + 10


def test_memory_stays_within_bound_over_the_conversation_trace() -> None:
    """The whole Mooncake conversation trace, round-robin over 8 backends, a small bound."""
    idx = PrefixIndex(max_blocks=20_000)
    backends = [f"b{i}" for i in range(8)]
    for b in backends:
        idx.add_backend(b, 2_000_000, 512)
    peak = 0
    hits = 0
    with TRACE.open() as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            blocks = row["hash_ids"]
            hits += bool(idx.match(blocks))
            idx.insert(
                backends[i % 8],
                blocks,
                row["timestamp"] / 1000,
                512,
                prompt_tokens=row["input_length"],
            )
            peak = max(peak, idx.entries())
    assert i + 1 == 12_031
    assert peak <= 20_000
    assert idx.approx_bytes() <= 20_000 * (130 + 110)
    assert hits > 0


@pytest.mark.parametrize(("n_backends", "shared"), [(8, False), (8, True), (256, True)])
def test_approx_bytes_is_close_to_measured(n_backends: int, shared: bool) -> None:
    rng = random.Random(0)
    chains = [[rng.getrandbits(64) for _ in range(100)] for _ in range(300)]
    gc.collect()
    tracemalloc.start()
    idx = PrefixIndex()
    for b in range(n_backends):
        idx.add_backend(f"b{b}", None, 64)
    before = tracemalloc.get_traced_memory()[0]
    for k, blocks in enumerate(chains):
        idx.insert(f"b{k % n_backends}", blocks, 0.0, 64)
        if shared:
            idx.insert(f"b{(k + 1) % n_backends}", blocks, 0.0, 64)
    measured = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    estimate = idx.approx_bytes()
    assert 0.7 * measured <= estimate <= 1.4 * measured, (measured, estimate)


@pytest.mark.parametrize("n_backends", [8, 256])
def test_match_is_fast(n_backends: int) -> None:
    """128 blocks (8k tokens at 64) against an index with ~100k blocks."""
    rng = random.Random(1)
    idx = PrefixIndex()
    names = [f"b{i}" for i in range(n_backends)]
    for n in names:
        idx.add_backend(n, None, 64)
    system = [rng.getrandbits(64) for _ in range(16)]
    for k in range(800):  # every backend holds the system prompt; conversations spread
        idx.insert(
            names[k % n_backends], system + [rng.getrandbits(64) for _ in range(112)], 0.0, 64
        )
    query = system + [rng.getrandbits(64) for _ in range(112)]
    times = []
    for _ in range(200):
        t = time.perf_counter()
        m = idx.match(query)
        times.append(time.perf_counter() - t)
    assert len(m) == n_backends
    med = statistics.median(times)
    print(f"match 128 blocks, {n_backends} backends: median {med * 1e6:.1f} us")
    assert med < 300e-6
