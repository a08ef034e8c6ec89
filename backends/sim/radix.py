"""The simulated engine's prefix cache: a radix tree of cache units with LRU eviction.

A prompt is a chain of units (see `api.py`): unit i's id names the prompt's content up to and
including unit i, so equal ids mean equal prefixes and the tree needs no edge labels. Every
edge holds exactly one unit; each node keeps a dict `id -> child` and a parent pointer::

    root ── u0 ── u1 ── u2          (prompt A: units u0 u1 u2)
               └── v1 ── v2 ── v3   (prompt B shares u0 with A)

The device pool (`capacity_tokens`) holds the tree's device nodes plus the tokens the engine
has `reserve`d for running requests (their uncached prompt and their output). Like SGLang's
`RadixCache`:

* `match` walks the prompt's units and stops at the first unknown one. The match is capped at
  n - 1 tokens: when every token of the prompt is cached the last unit is dropped, since the
  last token must be recomputed to get its logits. `match(..., now=None)` is a pure probe; with
  a time it refreshes the matched path's `last_access` (LRU).
* A request `lock`s the deepest node of its prefix while it runs; `lock_ref` counts on every node
  up to the root move that node's tokens from "evictable" to "protected".
* `evict(n)` frees device tokens by removing least-recently-used **unlocked leaves** only, from a
  heap with lazy deletion (an entry is skipped when its node is gone, locked or no longer a
  leaf; re-pushed when its node was touched since: access times only grow, so a stale key is
  never later than the true one and pops stay in LRU order).
* The clock is injected: every time comes in as an argument.

Host tier (SGLang HiCache), when `host_capacity_tokens > 0`: a unit evicted from the device
moves to a host pool with its own LRU (host leaves are evicted from it the same way; a unit the
host cannot take is dropped along with its host-only descendants). Tiers are exclusive: a unit
lives on the device or on the host, never both, and device nodes always form a subtree hanging
from the root (a node's parent is on the device whenever the node is). `match` continues from
the device part into host nodes; `load_host` moves a match's host part back to the device (the
engine charges its copy time to the request's prefill).

Simplifications: units are never split (SGLang's page_size > 1 behaves this way too); a unit
id seen again with more tokens than its node holds (a prompt's partial last page, later
extended) matches only the node's tokens and stops the match there, and an insert grows the
node in place when it has no children.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from backends.sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["InsertResult", "MatchResult", "RadixCache", "RadixNode"]


class RadixNode:
    """One cache unit. Mutable and owned by its `RadixCache`; callers only hold it for locks."""

    __slots__ = (
        "children",
        "dev_children",
        "key",
        "last_access",
        "live",
        "lock_ref",
        "on_device",
        "parent",
        "tokens",
    )

    def __init__(self, key: int | None, parent: RadixNode | None, tokens: int, now: float) -> None:
        self.key = key
        self.parent = parent
        self.tokens = tokens
        self.last_access = now
        self.lock_ref = 0
        self.on_device = True
        self.live = True
        self.children: dict[int, RadixNode] = {}
        self.dev_children = 0

    def __repr__(self) -> str:
        tier = "dev" if self.on_device else "host"
        return f"RadixNode({self.key}, {self.tokens} tok, {tier}, lock={self.lock_ref})"


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchResult:
    """How much of a prompt the cache holds: a device part, then a host part."""

    device_units: int
    device_tokens: int
    host_units: int
    host_tokens: int
    host_load_tokens: int  # device room that loading the host part takes (whole units)
    device_node: RadixNode  # deepest matched device node (the root when none)
    last_node: RadixNode  # deepest matched node of either tier

    @property
    def units(self) -> int:
        return self.device_units + self.host_units

    @property
    def tokens(self) -> int:
        return self.device_tokens + self.host_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class InsertResult:
    """What an insert changed on the device."""

    stored_tokens: int  # newly held on the device: new units, host units taken back, growth
    duplicate_tokens: int  # already on the device (another request computed them first)
    last_node: RadixNode


class RadixCache:
    """Radix cache over chained unit ids with a device pool and an optional host pool."""

    def __init__(
        self,
        capacity_tokens: int,
        host_capacity_tokens: int = 0,
        *,
        record_events: bool = False,
    ) -> None:
        if capacity_tokens <= 0:
            raise ValueError("capacity_tokens must be positive")
        if host_capacity_tokens < 0:
            raise ValueError("host_capacity_tokens must be >= 0")
        self.capacity_tokens = capacity_tokens
        self.host_capacity_tokens = host_capacity_tokens
        self.record_events = record_events
        self._events: list[KVEvent] = []
        self._seq = itertools.count()
        self._reset()

    def _reset(self) -> None:
        self.root = RadixNode(None, None, 0, 0.0)
        self._units = 0
        self._dev_heap: list[tuple[float, int, RadixNode]] = []
        self._host_heap: list[tuple[float, int, RadixNode]] = []
        self.device_tokens = 0  # tokens of device nodes
        self.evictable_tokens = 0  # device nodes with lock_ref == 0
        self.protected_tokens = 0  # device nodes with lock_ref > 0
        self.host_tokens = 0
        self.reserved_tokens = 0  # device tokens held outside the tree (running requests)

    # -- sizes -----------------------------------------------------------------------------

    @property
    def available_tokens(self) -> int:
        """Device tokens free right now, without evicting anything."""
        return self.capacity_tokens - self.device_tokens - self.reserved_tokens

    @property
    def host_available_tokens(self) -> int:
        return self.host_capacity_tokens - self.host_tokens

    def __len__(self) -> int:
        """Units held, both tiers."""
        return self._units

    # -- lookup ----------------------------------------------------------------------------

    def match(
        self, units: Sequence[int], sizes: Sequence[int], now: float | None = None
    ) -> MatchResult:
        """The cached prefix of a prompt (units with their token counts), capped at n - 1 tokens.

        With `now`, the matched path counts as used at `now` (LRU); without, nothing changes.
        """
        if len(units) != len(sizes):
            raise ValueError("units and sizes differ in length")
        node = self.root
        dev_units = dev_tokens = host_units = host_tokens = host_load = 0
        device_node = self.root
        for uid, size in zip(units, sizes, strict=True):
            child = node.children.get(uid)
            if child is None:
                break
            node = child
            got = min(child.tokens, size)
            if child.on_device:
                dev_units += 1
                dev_tokens += got
                device_node = child
            else:
                host_units += 1
                host_tokens += got
                host_load += child.tokens
            if got < size:
                break
        if dev_units + host_units == len(units) and dev_tokens + host_tokens == sum(sizes):
            # Never the whole prompt: the last token is recomputed for its logits.
            dropped = node
            node = dropped.parent if dropped.parent is not None else self.root
            got = min(dropped.tokens, sizes[-1])
            if dropped.on_device:
                dev_units -= 1
                dev_tokens -= got
                device_node = node
            else:
                host_units -= 1
                host_tokens -= got
                host_load -= dropped.tokens
        if now is not None:
            self.touch(node, now)
        return MatchResult(
            device_units=dev_units,
            device_tokens=dev_tokens,
            host_units=host_units,
            host_tokens=host_tokens,
            host_load_tokens=host_load,
            device_node=device_node,
            last_node=node,
        )

    def touch(self, node: RadixNode, now: float) -> None:
        """Mark `node` and its ancestors used at `now`."""
        cur: RadixNode | None = node
        while cur is not None and cur is not self.root:
            if now > cur.last_access:
                cur.last_access = now
            cur = cur.parent

    # -- locks -----------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction (counted: nest freely)."""
        cur: RadixNode | None = node
        while cur is not None and cur is not self.root:
            if cur.lock_ref == 0 and cur.on_device:
                self.evictable_tokens -= cur.tokens
                self.protected_tokens += cur.tokens
            cur.lock_ref += 1
            cur = cur.parent

    def unlock(self, node: RadixNode) -> None:
        cur: RadixNode | None = node
        while cur is not None and cur is not self.root:
            if cur.lock_ref <= 0:
                raise ValueError(f"unlock of an unlocked node {cur!r}")
            cur.lock_ref -= 1
            if cur.lock_ref == 0:
                if cur.on_device:
                    self.protected_tokens -= cur.tokens
                    self.evictable_tokens += cur.tokens
                    if cur.dev_children == 0:
                        self._push(self._dev_heap, cur)
                elif not cur.children:
                    self._push(self._host_heap, cur)
            cur = cur.parent

    # -- device pool outside the tree ------------------------------------------------------

    def reserve(self, tokens: int) -> None:
        """Hold `tokens` of the device pool for a running request (see `make_room`)."""
        if tokens < 0 or tokens > self.available_tokens:
            raise ValueError(f"cannot reserve {tokens} tokens ({self.available_tokens} free)")
        self.reserved_tokens += tokens

    def release(self, tokens: int) -> None:
        if tokens < 0 or tokens > self.reserved_tokens:
            raise ValueError(f"cannot release {tokens} tokens ({self.reserved_tokens} reserved)")
        self.reserved_tokens -= tokens

    def make_room(self, tokens: int) -> bool:
        """Evict until `tokens` are available; False, evicting nothing, when they cannot be.

        Every unlocked device node can be evicted (children go first), so the check against
        `evictable_tokens` is exact.
        """
        short = tokens - self.available_tokens
        if short > self.evictable_tokens:
            return False
        if short > 0:
            self.evict(short)
        return self.available_tokens >= tokens

    # -- insert and load -------------------------------------------------------------------

    def insert(self, units: Sequence[int], sizes: Sequence[int], now: float) -> InsertResult:
        """Put a computed prompt on the device; the caller released its reservation first.

        Never overfills the pool: in the odd case where a unit needs more room than is free
        (a host unit larger than the caller's copy of it), the insert stops there.
        """
        if len(units) != len(sizes):
            raise ValueError("units and sizes differ in length")
        node = self.root
        stored = duplicate = 0
        new_run: list[RadixNode] = []
        run_parent: RadixNode = self.root
        for uid, size in zip(units, sizes, strict=True):
            child = node.children.get(uid)
            if child is None:
                if size > self.available_tokens:
                    break
                child = RadixNode(uid, node, size, now)
                node.children[uid] = child
                node.dev_children += 1
                self._units += 1
                self.device_tokens += size
                self.evictable_tokens += size
                stored += size
                if not new_run:
                    run_parent = node
                new_run.append(child)
            else:
                self._flush_stored(run_parent, new_run)
                new_run = []
                if not child.on_device:
                    if child.tokens > self.available_tokens:
                        break
                    stored += child.tokens
                    self._to_device(child)
                else:
                    duplicate += min(child.tokens, size)
                grow = size - child.tokens
                if 0 < grow <= self.available_tokens and not child.children:
                    child.tokens = size
                    self.device_tokens += grow
                    if child.lock_ref:
                        self.protected_tokens += grow
                    else:
                        self.evictable_tokens += grow
                    stored += grow
                if now > child.last_access:
                    child.last_access = now
            node = child
        self._flush_stored(run_parent, new_run)
        if node is not self.root and node.dev_children == 0:
            self._push(self._dev_heap, node)
        return InsertResult(stored_tokens=stored, duplicate_tokens=duplicate, last_node=node)

    def load_host(self, match: MatchResult) -> int:
        """Move a match's host part back to the device; returns the tokens moved.

        The caller made room for `match.host_load_tokens` and holds a lock on `match.last_node`.
        """
        if match.host_units == 0:
            return 0
        if match.host_load_tokens > self.available_tokens:
            raise ValueError("no room on the device for the host part (make_room first)")
        path: list[RadixNode] = []
        cur: RadixNode | None = match.last_node
        while cur is not None and cur is not match.device_node:
            if cur.on_device or not cur.live:
                raise ValueError("stale match: the cache changed since it was made")
            path.append(cur)
            cur = cur.parent
        moved = 0
        for node in reversed(path):
            moved += node.tokens
            self._to_device(node)
        return moved

    # -- eviction --------------------------------------------------------------------------

    def evict(self, tokens: int) -> int:
        """Free at least `tokens` device tokens if unlocked leaves allow; returns tokens freed."""
        freed = 0
        heap = self._dev_heap
        while freed < tokens and heap:
            stamp, _, node = heapq.heappop(heap)
            if not node.live or not node.on_device or node.lock_ref > 0 or node.dev_children:
                continue
            if stamp < node.last_access:
                self._push(heap, node)
                continue
            freed += node.tokens
            self._evict_device_node(node)
        return freed

    def _evict_device_node(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None
        self.device_tokens -= node.tokens
        self.evictable_tokens -= node.tokens
        node.on_device = False
        parent.dev_children -= 1
        if self.record_events:
            self._events.append(BlockRemoved(block_hashes=(self._key(node),), medium="GPU"))
        if parent is not self.root and parent.dev_children == 0 and parent.lock_ref == 0:
            self._push(self._dev_heap, parent)
        if self.host_capacity_tokens > 0 and self._host_make_room(node.tokens):
            self.host_tokens += node.tokens
            if self.record_events:
                self._events.append(
                    BlockStored(
                        block_hashes=(self._key(node),),
                        parent_block_hash=parent.key,
                        token_counts=(node.tokens,),
                        medium="CPU",
                    )
                )
            if not node.children:
                self._push(self._host_heap, node)
        else:
            self._drop_subtree(node)

    def _host_make_room(self, tokens: int) -> bool:
        heap = self._host_heap
        while self.host_available_tokens < tokens and heap:
            stamp, _, node = heapq.heappop(heap)
            if not node.live or node.on_device or node.lock_ref > 0 or node.children:
                continue
            if stamp < node.last_access:
                self._push(heap, node)
                continue
            self._drop_host_leaf(node)
        return self.host_available_tokens >= tokens

    def _drop_host_leaf(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None
        self.host_tokens -= node.tokens
        self._unlink(node)
        if self.record_events:
            self._events.append(BlockRemoved(block_hashes=(self._key(node),), medium="CPU"))
        if (
            parent is not self.root
            and not parent.on_device
            and not parent.children
            and parent.lock_ref == 0
        ):
            self._push(self._host_heap, parent)

    def _drop_subtree(self, node: RadixNode) -> None:
        """Forget a node that just left the device, with its host-only descendants."""
        stack = list(node.children.values())
        removed: list[int] = []
        while stack:
            cur = stack.pop()
            stack.extend(cur.children.values())
            self.host_tokens -= cur.tokens
            cur.live = False
            self._units -= 1
            removed.append(self._key(cur))
        node.children.clear()
        self._unlink(node)
        if self.record_events and removed:
            self._events.append(BlockRemoved(block_hashes=tuple(removed), medium="CPU"))

    def _unlink(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[self._key(node)]
        self._units -= 1
        node.live = False

    def _to_device(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None and parent.on_device, "device nodes hang from device nodes"
        node.on_device = True
        parent.dev_children += 1
        self.host_tokens -= node.tokens
        self.device_tokens += node.tokens
        if node.lock_ref:
            self.protected_tokens += node.tokens
        else:
            self.evictable_tokens += node.tokens
        if node.dev_children == 0:
            self._push(self._dev_heap, node)
        if self.record_events:
            self._events.append(BlockRemoved(block_hashes=(self._key(node),), medium="CPU"))
            self._events.append(
                BlockStored(
                    block_hashes=(self._key(node),),
                    parent_block_hash=parent.key,
                    token_counts=(node.tokens,),
                    medium="GPU",
                )
            )

    def _flush_stored(self, parent: RadixNode, run: list[RadixNode]) -> None:
        if self.record_events and run:
            self._events.append(
                BlockStored(
                    block_hashes=tuple(self._key(n) for n in run),
                    parent_block_hash=parent.key,
                    token_counts=tuple(n.tokens for n in run),
                    medium="GPU",
                )
            )

    def _push(self, heap: list[tuple[float, int, RadixNode]], node: RadixNode) -> None:
        heapq.heappush(heap, (node.last_access, next(self._seq), node))

    @staticmethod
    def _key(node: RadixNode) -> int:
        assert node.key is not None, "the root has no key"
        return node.key

    # -- whole cache -----------------------------------------------------------------------

    def reset(self) -> bool:
        """Drop every unit (SGLang's flush_cache); refused while anything is locked or reserved."""
        if self.protected_tokens or self.reserved_tokens or self._any_locked():
            return False
        for node in self._walk():
            node.live = False
        self._reset()
        if self.record_events:
            self._events.append(AllBlocksCleared())
        return True

    def _any_locked(self) -> bool:
        return any(n.lock_ref for n in self._walk())

    def _walk(self) -> list[RadixNode]:
        """Every node but the root, parents before children."""
        out: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def take_events(self) -> list[KVEvent]:
        """Drain the recorded KV events (empty unless `record_events`)."""
        events, self._events = self._events, []
        return events

    def check(self) -> None:
        """Recount everything from the nodes and raise AssertionError on any drift (tests)."""
        dev = evictable = protected = host = 0
        nodes = self._walk()
        assert len(nodes) == self._units, (len(nodes), self._units)
        for node in nodes:
            assert node.live
            parent = node.parent
            assert parent is not None and parent.children.get(self._key(node)) is node
            if node.on_device:
                assert parent.on_device, f"{node!r} on device under a host node"
                dev += node.tokens
                if node.lock_ref:
                    protected += node.tokens
                else:
                    evictable += node.tokens
            else:
                host += node.tokens
            assert node.dev_children == sum(c.on_device for c in node.children.values())
        assert self.root.dev_children == sum(c.on_device for c in self.root.children.values())
        assert (dev, evictable, protected, host) == (
            self.device_tokens,
            self.evictable_tokens,
            self.protected_tokens,
            self.host_tokens,
        ), (dev, evictable, protected, host)
        assert self.available_tokens >= 0 and self.host_available_tokens >= 0
