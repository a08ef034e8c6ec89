"""`cache_aware`: sglang-router 0.3.2's cache-aware policy, on token blocks instead of characters.

How sglang-router 0.3.2 routes (src/policies/cache_aware.rs and tree.rs; the wheel's binary is
the `smg` gateway build), and how this module reproduces it
===========================================================================================

The router keeps an *approximate* picture of each worker's prompt cache: one radix tree over
the text of every request it routed, each node tagged with the workers ("tenants") the text
was sent to and when. It never asks a worker what it holds. Load is the router's own count of
in-flight requests per worker (incremented when routed, decremented when the response ends).

Per request::

    loads = in-flight count of every worker
    if max(loads) - min(loads) > balance_abs_threshold
       and max(loads) > min(loads) * balance_rel_threshold:         # "imbalanced"
        pick the least-loaded worker                                  (ties: first in order)
    else:
        match_rate = matched characters / characters of the request  (0 for empty text)
        if match_rate > cache_threshold:
            pick the worker holding the deepest match                 (even if more loaded)
        else:
            pick the least-loaded worker                              (ties: first in order)
    insert the request's text under the chosen worker, at once (in every branch)

Every `eviction_interval_secs` a background thread trims each worker's share of the tree to
`max_tree_size` characters by removing its least-recently-used leaves.

The knobs, with 0.3.2's CLI defaults (sglang_router/router_args.py of the installed wheel):

- `cache_threshold` = 0.3 (float in [0, 1]). Minimum share of the prompt that must already
  sit in one worker's tree for affinity to win. Strictly greater: a match rate of exactly
  0.3 is a miss. Higher values keep balance at the cost of cache hits.
- `balance_abs_threshold` = 64 (requests). The in-flight gap between the busiest and the
  idlest worker that may trigger balancing. Strictly greater: a gap of exactly 64 is balanced.
- `balance_rel_threshold` = 1.5. Balancing also needs max > min * 1.5 (strictly), so a gap of
  65 among heavily loaded workers (say 200 vs 135) is not imbalance. Both conditions must hold.
- `eviction_interval_secs` = 60 (seconds; 0 disables eviction). How often trees are trimmed.
- `max_tree_size` = 2**26 (67,108,864). Per-worker bound on the tree, in characters there and
  in tokens here. Between evictions a tree may grow past it.

What 0.3.2 does where versions differ (checked against the installed 0.3.2 wheel, not only
against the repository's history, which has several variants):

- The low-match branch picks the *least-loaded* worker. Older versions (0.1.x) picked the
  worker with the smallest tree ("most free cache"), and the essay atop cache_aware.rs still
  says so; later ones break load ties randomly. We ran the real 0.3.2 router against two stub
  workers: distinct low-match prompts sent one after another (all loads 0) all went to the same
  first worker, even when the other worker's tree was empty. So: least loaded, ties to the
  first worker in order (Rust's `min_by_key` returns the first minimum).
- The same experiment with requests held open showed the other two branches: prompts sharing
  a prefix all went to one worker (high match beats load) until it had exactly 65 in flight
  against 0, when the next went to the idle worker (64 < 65: imbalance is strict `>`).
- Rates are compared in f32 in Rust (`matched as f32 / total as f32 > threshold`,
  `max as f32 > min as f32 * rel`). We round to f32 too, so boundary cases land as there.
- At the deepest matched node several tenants may hold the prefix. 0.3.2's tree returns the
  node's cached `last_tenant` (the tenant that created the node, while it still holds it),
  else the first in its hash map's order. We pick the backend that has held the deepest
  matched block the longest (the first still-holding inserter), and keep backend order
  beyond that: deterministic, and the same rule as `last_tenant` wherever that is defined.

Where we differ from 0.3.2, and why
-----------------------------------

- Tokens in blocks instead of characters. The simulator has no text, only chained block hashes
  (Mooncake `hash_ids`, or our own 64-token blocks in the proxy), and an engine caches tokens.
  `matched` is the prompt tokens covered by the deepest matched block, so matches move in steps
  of a block; `match_rate = matched tokens / prompt tokens`. Sizes for eviction count tokens.
  Because block i's hash chains on block i-1, "block i is in b's tree" means b's tree holds the
  whole prefix up to block i: a per-backend `dict` of blocks is a radix tree without the string
  compares, and a lookup costs one dict probe per block.
- Eviction runs on the caller's clock: the first `choose` at or after each interval boundary of
  `now` trims every tree (no background thread, no wall clock), so a simulation is repeatable.
- LRU order is a counter, bumped per routed request, that touches every block of the request
  under the chosen backend (0.3.2 also uses an epoch counter; older versions used wall-clock
  milliseconds). Matching also touches the matched backend's path, like 0.3.2's prefix_match.
- Balancing looks at the loads of routable backends only; 0.3.2 takes min and max over all
  workers of the model, unhealthy ones included. The core never offers unroutable backends.
- When the deepest match's holder is not offered (unhealthy, draining, or excluded on a
  retry) we take the first routable backend like 0.3.2, but keep the holder's tree: 0.3.2
  wipes it, which suits a dead worker but not a draining one or one excluded for one retry.
  0.3.2's random fallback for a missing tree cannot happen: trees follow backend add/remove.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.core.model import BackendState, BasePolicy, Choice, RequestRecord, RouteRequest
from router.core.policies import build_config, register_policy

__all__ = ["BlockTrees", "CacheAwareConfig", "CacheAwarePolicy", "PrefixMatch"]

_F32 = struct.Struct("f")


def _f32(x: float) -> float:
    """Round to the nearest f32, as Rust's `as f32` and f32 arithmetic do."""
    value: float = _F32.unpack(_F32.pack(x))[0]
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheAwareConfig:
    """sglang-router 0.3.2's knobs and CLI defaults (the module docstring explains each)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_s: float = 60.0
    max_tree_size: int = 2**26  # tokens per backend

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be within [0, 1]")
        if self.balance_abs_threshold < 0:
            raise ValueError("balance_abs_threshold must be non-negative")
        if self.balance_rel_threshold < 0:
            raise ValueError("balance_rel_threshold must be non-negative")
        if self.eviction_interval_s < 0:
            raise ValueError("eviction_interval_s must be non-negative (0 disables eviction)")
        if self.max_tree_size < 0:
            raise ValueError("max_tree_size must be non-negative")


class _Node:
    """One block in one backend's tree: parent link, LRU stamp, size, children count."""

    __slots__ = ("children", "parent", "stamp", "tokens")

    def __init__(self, parent: int | None, stamp: int, tokens: int) -> None:
        self.parent = parent
        self.stamp = stamp
        self.tokens = tokens
        self.children = 0  # children held by the same backend; 0 means a leaf


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixMatch:
    """The deepest match of a request over all trees: how many blocks, and who holds them."""

    blocks: int
    backend: str | None  # the tie-broken holder of the deepest block; None when blocks == 0


class BlockTrees:
    """Per-backend radix trees of chained block hashes, sharing one index for matching.

    `holders[h]` maps each backend holding block h to its node, in the order they inserted it,
    so the deepest match over all backends is one walk down the request's blocks. A backend's
    blocks are prefix-closed (insertion adds whole chains, eviction removes leaves only), so
    the holders of block i+1 are always a subset of the holders of block i.
    """

    def __init__(self) -> None:
        self.holders: dict[int, dict[str, _Node]] = {}
        self.nodes: dict[str, dict[int, _Node]] = {}
        self.sizes: dict[str, int] = {}
        self.clock = 0

    def match(self, blocks: Sequence[int]) -> PrefixMatch:
        """Deepest block depth held by any backend, and its holder (first inserter first)."""
        holders = self.holders
        depth = 0
        deepest: dict[str, _Node] | None = None
        for h in blocks:
            found = holders.get(h)
            if not found:
                break
            deepest = found
            depth += 1
        if deepest is None:
            return PrefixMatch(blocks=0, backend=None)
        return PrefixMatch(blocks=depth, backend=next(iter(deepest)))

    def depth(self, backend: str, blocks: Sequence[int]) -> int:
        """Leading blocks of `blocks` held by `backend`."""
        nodes = self.nodes.get(backend)
        if not nodes:
            return 0
        depth = 0
        for h in blocks:
            if h not in nodes:
                break
            depth += 1
        return depth

    def touch(self, backend: str, blocks: Sequence[int], depth: int) -> None:
        """Mark the first `depth` blocks as just used by `backend`."""
        nodes = self.nodes.get(backend)
        if not nodes:
            return
        self.clock += 1
        for h in blocks[:depth]:
            nodes[h].stamp = self.clock

    def insert(self, backend: str, req: RouteRequest) -> None:
        """Add the request's blocks under `backend`, stamping the whole path as just used."""
        nodes = self.nodes.setdefault(backend, {})
        size = self.sizes.get(backend, 0)
        self.clock += 1
        stamp = self.clock
        holders = self.holders
        parent: int | None = None
        block_tokens = req.block_tokens
        remaining = req.prompt_tokens
        for h in req.blocks:
            node = nodes.get(h)
            if node is None:
                tokens = min(block_tokens, remaining) if remaining > 0 else 0
                node = _Node(parent, stamp, tokens)
                nodes[h] = node
                holders.setdefault(h, {})[backend] = node
                size += tokens
                if parent is not None:
                    nodes[parent].children += 1
            else:
                node.stamp = stamp
            remaining -= block_tokens
            parent = h
        self.sizes[backend] = size

    def remove_backend(self, backend: str) -> None:
        """Drop a backend's whole tree (0.3.2's remove_tenant)."""
        for h in self.nodes.pop(backend, {}):
            owners = self.holders[h]
            del owners[backend]
            if not owners:
                del self.holders[h]
        self.sizes.pop(backend, None)

    def evict(self, backend: str, max_tokens: int) -> int:
        """Remove `backend`'s least-recently-used leaves until it holds <= max_tokens.

        A parent whose last child goes becomes a leaf and joins the queue with its own stamp,
        as in 0.3.2's evict_tenant_by_size. Returns the tokens removed.
        """
        nodes = self.nodes.get(backend)
        size = self.sizes.get(backend, 0)
        if nodes is None or size <= max_tokens:
            return 0
        heap = [(n.stamp, h) for h, n in nodes.items() if n.children == 0]
        heapq.heapify(heap)
        removed = 0
        while heap and size > max_tokens:
            _, h = heapq.heappop(heap)
            node = nodes.pop(h)
            owners = self.holders[h]
            del owners[backend]
            if not owners:
                del self.holders[h]
            size -= node.tokens
            removed += node.tokens
            if node.parent is not None:
                parent = nodes[node.parent]
                parent.children -= 1
                if parent.children == 0:
                    heapq.heappush(heap, (parent.stamp, node.parent))
        self.sizes[backend] = size
        return removed


@register_policy
class CacheAwarePolicy(BasePolicy):
    """sglang-router 0.3.2's cache_aware on token blocks (module docstring)."""

    name: ClassVar[str] = "cache_aware"
    needs_blocks: ClassVar[bool] = True

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        self.config = build_config(CacheAwareConfig, options, self.name)
        self.trees = BlockTrees()
        self._next_eviction: float | None = None
        self._threshold32 = _f32(self.config.cache_threshold)
        self._rel32 = _f32(self.config.balance_rel_threshold)
        self.decisions = {"imbalanced": 0, "cache_hit": 0, "cache_miss": 0, "holder_unroutable": 0}
        self.evictions = 0

    def _maybe_evict(self, now: float) -> None:
        interval = self.config.eviction_interval_s
        if interval <= 0:
            return
        if self._next_eviction is None:
            self._next_eviction = now + interval
            return
        if now < self._next_eviction:
            return
        while self._next_eviction <= now:
            self._next_eviction += interval
        self.evictions += 1
        for backend in list(self.trees.nodes):
            self.trees.evict(backend, self.config.max_tree_size)

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        self._maybe_evict(now)
        loads = [b.load for b in backends]
        max_load = max(loads)
        min_load = min(loads)
        least = backends[loads.index(min_load)]  # first minimum, as Rust's min_by_key
        if max_load - min_load > self.config.balance_abs_threshold and _f32(max_load) > _f32(
            _f32(min_load) * self._rel32
        ):
            self.decisions["imbalanced"] += 1
            return self._choice(req, least, "imbalanced")
        match = self.trees.match(req.blocks)
        matched_tokens = req.tokens_in_blocks(match.blocks)
        rate = _f32(matched_tokens / req.prompt_tokens) if req.prompt_tokens > 0 else 0.0
        if match.backend is not None:
            self.trees.touch(match.backend, req.blocks, match.blocks)
        if rate > self._threshold32 and match.backend is not None:
            chosen = next((b for b in backends if b.id == match.backend), None)
            if chosen is not None:
                self.decisions["cache_hit"] += 1
                return Choice(
                    backend=chosen.id, predicted_cached_tokens=matched_tokens, reason="cache_hit"
                )
            # The holder is not offered (unhealthy, draining or excluded): like 0.3.2, fall
            # back to the first routable backend. 0.3.2 also wipes the holder's tree there; we
            # keep it, since draining and retry exclusion are passing states here.
            self.decisions["holder_unroutable"] += 1
            return self._choice(req, backends[0], "holder_unroutable")
        self.decisions["cache_miss"] += 1
        return self._choice(req, least, "cache_miss")

    def _choice(self, req: RouteRequest, backend: BackendState, reason: str) -> Choice:
        cached = req.tokens_in_blocks(self.trees.depth(backend.id, req.blocks))
        return Choice(backend=backend.id, predicted_cached_tokens=cached, reason=reason)

    def on_routed(self, rec: RequestRecord, now: float) -> None:
        self.trees.insert(rec.backend, rec.request)

    def on_backend_removed(self, backend_id: str) -> None:
        self.trees.remove_backend(backend_id)

    def stats(self) -> dict[str, Any]:
        """Decision counts and tree sizes, for RoutingCore.stats()."""
        return {
            "decisions": dict(self.decisions),
            "evictions": self.evictions,
            "tree_tokens": dict(self.trees.sizes),
            "tree_blocks": {b: len(n) for b, n in self.trees.nodes.items()},
        }
