"""The prefix index: which backends the router believes hold which block chains.

Two structures, kept in step:

- ``holders: dict[block hash, int]``: a bitmask of the backends believed to hold the block
  (backend i is bit i; bits of removed backends are reused). `match` walks a request's
  blocks once, AND-ing masks; a backend leaves the running mask at the first block it lacks,
  and that depth is its match. O(prompt blocks) big-int ANDs whatever the pool size, plus
  one dict entry per matching backend at the end.
- per backend, an LRU (``OrderedDict[block hash, packed]``) with the backend's KV capacity in
  tokens. ``packed = stamp << 24 | size``: ``stamp`` is a global counter bumped once per
  insert (so LRU order is comparable across backends without trusting clocks) and ``size``
  is the block's tokens (the last block of a prompt may be partial).

Eviction modelling. Inserting a chain refreshes every block of it, deepest first, so within
the LRU a block always sits after (is fresher than) its descendants, and popping from the
front evicts leaves before their parents, as SGLang's radix cache does: evicting a block
never leaves a deeper block of the same chain counting as matched. A backend over its
capacity drops its LRU front until it fits. ``max_blocks`` bounds the (block, backend) entries
of all backends together: beyond it the globally least-recently inserted entries go, merged
across backends by stamp with a heap, in batches (down to 1/64 below the bound) so the cost
is amortised.

Memory. Each (block, backend) entry costs an OrderedDict slot and node, ~104 B (its packed
int is shared by every block of the refresh that wrote it); each distinct block a ``holders``
slot, ~55 B, plus its mask int once the pool has more than 8 backends (~4 B per 30 backends).
Block-hash ints are shared with the requests that carried them. `approx_bytes` uses these
figures (measured with tracemalloc on CPython 3.11; the tests check them), so
``max_blocks = 1_000_000`` costs ~160 MB at worst (every entry a distinct block, 8 backends),
~205 MB with 256 backends, less when backends share blocks.

Feedback (`observe_cached`, called when a response says how many prompt tokens the backend
had cached): the leading blocks it had are confirmed, and the backend now holds the whole
prompt (it just prefilled it), so the chain is refreshed. If it had less than the router
predicted, the backend has evicted more than our capacity model did: the shortfall, in
tokens, is dropped from the backend's least-recently-used beliefs. KV events
(`apply_stored`, `apply_removed`, `clear_backend`) set beliefs exactly.

One source of truth per backend: `set_event_driven(backend, True)` drops its modelled entries
and from then on routing beliefs (`insert`, `touch`'s refresh, `observe_cached`) leave it
alone and no capacity model evicts for it; only events change it. Switching back drops the
event-driven entries, and the modelled LRU starts empty. Events arrive once a prefill is
done, so a request routed meanwhile would not see the prefix its predecessor is computing:
`expect` marks a routed chain as coming (counted per request, matched like held blocks, never
in the LRU or its token count) until `settle`, when the request ends; events have stored the
blocks by then, or they were never cached.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["IndexStats", "PrefixIndex"]

_SIZE_BITS = 24
_SIZE_MASK = (1 << _SIZE_BITS) - 1

# Bytes per structure, measured with tracemalloc on CPython 3.11 (see tests/test_core_index).
_ENTRY_BYTES = 104  # one (block, backend) entry: OrderedDict slot and node (packed int shared)
_BLOCK_BYTES = 55  # one distinct block: holders slot (masks of bits < 8 are cached small ints)


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexStats:
    """What the index holds, for /stats."""

    backends: int
    blocks: int
    entries: int
    max_blocks: int
    approx_bytes: int


class _Backend:
    __slots__ = ("bit", "block_tokens", "capacity", "events", "lru", "name", "pending", "tokens")

    def __init__(self, name: str, bit: int, capacity: int | None, block_tokens: int) -> None:
        self.name = name
        self.bit = bit
        self.capacity = capacity
        self.block_tokens = block_tokens
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.tokens = 0
        self.events = False  # entries come from KV events only (see set_event_driven)
        self.pending: dict[int, int] = {}  # event-driven: block -> requests computing it


class PrefixIndex:
    """Block chain -> backends believed to hold it, with per-backend LRU capacity models."""

    def __init__(self, *, max_blocks: int = 1_000_000) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._holders: dict[int, int] = {}
        self._backends: dict[str, _Backend] = {}
        self._names: list[str | None] = []  # bit -> backend name
        self._free_bits: list[int] = []
        self._entries = 0
        self._stamp = 0
        self.event_backends: set[str] = set()  # backends whose entries come from KV events
        self.evicted_capacity = 0  # entries dropped by a backend's capacity model
        self.evicted_global = 0  # entries dropped by the max_blocks bound
        self.dropped_feedback = 0  # entries dropped because a backend had less than believed

    # -- backends -----------------------------------------------------------------------------
    def add_backend(self, backend: str, capacity_tokens: int | None, block_tokens: int) -> None:
        """Track a backend (idempotent: a known backend gets the new capacity)."""
        if capacity_tokens is not None and capacity_tokens <= 0:
            raise ValueError("capacity_tokens must be positive")
        _check_block_tokens(block_tokens)
        be = self._backends.get(backend)
        if be is not None:
            be.capacity = capacity_tokens
            be.block_tokens = block_tokens
            self._fit(be)
            return
        if self._free_bits:
            bit = heapq.heappop(self._free_bits)
            self._names[bit] = backend
        else:
            bit = len(self._names)
            self._names.append(backend)
        self._backends[backend] = _Backend(backend, bit, capacity_tokens, block_tokens)

    def remove_backend(self, backend: str) -> None:
        """Forget a backend and everything it was believed to hold (no-op if unknown)."""
        be = self._backends.pop(backend, None)
        if be is None:
            return
        self.event_backends.discard(backend)
        self._clear(be)
        self._names[be.bit] = None
        heapq.heappush(self._free_bits, be.bit)

    def backends(self) -> list[str]:
        return list(self._backends)

    def set_event_driven(self, backend: str, on: bool) -> None:
        """Make KV events the backend's only source of entries (or go back to the model).

        Either switch drops what the backend was believed to hold: the two sources are never
        mixed.
        """
        be = self._backend(backend)
        if be.events != on:
            self._clear(be)
            be.events = on
            if on:
                self.event_backends.add(backend)
            else:
                self.event_backends.discard(backend)

    def event_driven(self, backend: str) -> bool:
        return self._backend(backend).events

    def expect(self, backend: str, blocks: Sequence[int]) -> None:
        """An event-driven backend was sent this chain: match it until `settle` (no-op else)."""
        be = self._backends.get(backend)
        if be is None or not be.events:
            return
        pending = be.pending
        bit = 1 << be.bit
        holders = self._holders
        for b in blocks:
            count = pending.get(b, 0)
            if not count and b not in be.lru:
                holders[b] = holders.get(b, 0) | bit
            pending[b] = count + 1

    def settle(self, backend: str, blocks: Sequence[int]) -> None:
        """The request that `expect`ed this chain ended: only events keep its blocks now."""
        be = self._backends.get(backend)
        if be is None or not be.pending:
            return
        pending = be.pending
        for b in blocks:
            count = pending.get(b)
            if count is None:
                continue
            if count > 1:
                pending[b] = count - 1
                continue
            del pending[b]
            if b not in be.lru:
                self._unhold(b, be.bit)

    # -- lookups ------------------------------------------------------------------------------
    def match(self, blocks: Sequence[int]) -> dict[str, int]:
        """Backend -> number of leading blocks of `blocks` it is believed to hold (> 0 only)."""
        if not blocks:
            return {}
        get = self._holders.get
        mask = get(blocks[0], 0)
        if not mask:
            return {}
        ends: list[tuple[int, int]] = []  # (backends that stopped, depth they reached)
        depth = 0
        for b in blocks:  # block 0 again (a hot lookup): cheaper than indexing from 1
            narrowed = mask & get(b, 0)
            if narrowed != mask:
                ends.append((mask & ~narrowed, depth))
                mask = narrowed
                if not mask:
                    break
            depth += 1
        if mask:
            ends.append((mask, depth))
        names = self._names
        result: dict[str, int] = {}
        for bits, reached in ends:
            while bits:
                low = bits & -bits
                name = names[low.bit_length() - 1]
                assert name is not None  # a freed bit is cleared from every mask first
                result[name] = reached
                bits ^= low
        return result

    def held_tokens(self, backend: str) -> int:
        """Tokens the backend is believed to hold (what its capacity model counts)."""
        return self._backend(backend).tokens

    def held_blocks(self, backend: str) -> int:
        return len(self._backend(backend).lru)

    def entries(self) -> int:
        """(block, backend) entries, the quantity `max_blocks` bounds."""
        return self._entries

    def blocks(self) -> int:
        """Distinct blocks held by at least one backend."""
        return len(self._holders)

    def approx_bytes(self) -> int:
        """Approximate memory of the index (figures in the module docstring)."""
        bits = len(self._names)
        mask_bytes = 0 if bits <= 8 else 28 + 4 * (bits // 60 + 1)  # a mid-pool bit, on average
        return self._entries * _ENTRY_BYTES + len(self._holders) * (_BLOCK_BYTES + mask_bytes)

    def stats(self) -> IndexStats:
        return IndexStats(
            backends=len(self._backends),
            blocks=len(self._holders),
            entries=self._entries,
            max_blocks=self.max_blocks,
            approx_bytes=self.approx_bytes(),
        )

    # -- beliefs from routing -----------------------------------------------------------------
    def insert(
        self,
        backend: str,
        blocks: Sequence[int],
        now: float,
        block_tokens: int,
        *,
        prompt_tokens: int | None = None,
    ) -> None:
        """The request was routed to `backend`: after its prefill the backend holds the chain.

        `prompt_tokens` sizes a partial last block exactly; without it every block counts as
        `block_tokens`. `now` is accepted for symmetry; recency is an internal counter.
        """
        be = self._backend(backend)
        _check_block_tokens(block_tokens)
        if not blocks or be.events:
            return
        last = _last_block_size(len(blocks), block_tokens, prompt_tokens)
        self._refresh(be, blocks, len(blocks), block_tokens, last)
        self._fit(be)
        self._bound()

    def touch(self, backend: str, blocks: Sequence[int], now: float) -> int:
        """A request reused the chain at `backend`: refresh the leading blocks it holds.

        Returns how many leading blocks were held (and refreshed).
        """
        be = self._backend(backend)
        lru = be.lru
        depth = 0
        for b in blocks:
            if b not in lru:
                break
            depth += 1
        if depth and not be.events:
            self._refresh(be, blocks, depth, be.block_tokens, None)
        return depth

    def observe_cached(
        self,
        backend: str,
        blocks: Sequence[int],
        cached_tokens: int,
        now: float,
        block_tokens: int,
        *,
        prompt_tokens: int | None = None,
        predicted_tokens: int | None = None,
        holds_prompt: bool = True,
    ) -> None:
        """Feedback: the backend reported `cached_tokens` of this prompt already cached.

        Its leading ``cached_tokens // block_tokens`` blocks are confirmed (inserted if the
        index had lost them). With `holds_prompt` (the response came after prefill, so SGLang
        now caches the prompt) the whole chain is refreshed; without it (the request died
        before prefill) beliefs beyond what the backend had are dropped. If it had fewer tokens
        than `predicted_tokens` (what routing assumed), the shortfall is dropped from the
        backend's least-recently-used beliefs: it has evicted more than our model thought.
        `cached_tokens` must be in the router's token units (scale it by the ratio of prompt
        sizes when the backend's tokenizer differs). A cache hit is capped at n-1 tokens, as
        SGLang does, so ``cached_tokens >= prompt_tokens - 1`` confirms every block.
        """
        if cached_tokens < 0:
            raise ValueError("cached_tokens must be non-negative")
        _check_block_tokens(block_tokens)
        be = self._backend(backend)
        if not blocks or be.events:
            return
        n = len(blocks)
        if prompt_tokens is not None and cached_tokens >= prompt_tokens - 1:
            had = n
        else:
            had = min(n, cached_tokens // block_tokens)
        last = _last_block_size(n, block_tokens, prompt_tokens)
        if predicted_tokens is not None and predicted_tokens - cached_tokens > block_tokens:
            # Forget the oldest beliefs (this chain's blocks are refreshed just below).
            shortfall = predicted_tokens - cached_tokens
            while shortfall > 0 and be.lru:
                shortfall -= self._evict_front(be)
                self.dropped_feedback += 1
        if holds_prompt:
            self._refresh(be, blocks, n, block_tokens, last)
        else:
            for b in blocks[had:]:
                if self._remove(be, b):
                    self.dropped_feedback += 1
            if had:
                self._refresh(be, blocks, had, block_tokens, last if had == n else None)
        self._fit(be)
        self._bound()

    # -- exact beliefs from KV events ---------------------------------------------------------
    def apply_stored(self, backend: str, blocks: Sequence[int], now: float) -> None:
        """KV event: the backend stored this chain (each block of its `block_tokens`).

        An event-driven backend is not fitted to a capacity: its own evictions arrive as
        `apply_removed`.
        """
        be = self._backend(backend)
        if blocks:
            self._refresh(be, blocks, len(blocks), be.block_tokens, None)
            if not be.events:
                self._fit(be)
            self._bound()

    def apply_removed(self, backend: str, blocks: Sequence[int]) -> None:
        """KV event: the backend evicted these blocks."""
        be = self._backend(backend)
        for b in blocks:
            self._remove(be, b)

    def clear_backend(self, backend: str) -> None:
        """KV event (AllBlocksCleared) or a restart/flush: the backend holds nothing."""
        self._clear(self._backend(backend))

    # -- internals ----------------------------------------------------------------------------
    def _backend(self, backend: str) -> _Backend:
        be = self._backends.get(backend)
        if be is None:
            raise KeyError(f"unknown backend {backend!r}: add_backend() it first")
        return be

    def _refresh(
        self, be: _Backend, blocks: Sequence[int], depth: int, size: int, last: int | None
    ) -> None:
        """Mark blocks[:depth] held and most recent, deepest first (leaves evict first).

        Every block of one refresh but the deepest (which may be partial) gets the same packed
        int: no allocation per block, and the next refresh of the chain reads one cached old
        value, not one cold object per block. Refreshing ~140 blocks of an 8.8k-token chat in a
        ~125k-entry LRU is memory-bound, so touching fewer cache lines is what saves time.
        """
        self._stamp += 1
        base = self._stamp << _SIZE_BITS
        lru = be.lru
        get = lru.get
        move_to_end = lru.move_to_end
        holders = self._holders
        bit = 1 << be.bit
        added = 0
        tokens = be.tokens
        top = depth - 1
        deepest = size if last is None else last
        runs = (  # (blocks, their size, their packed value): the deepest, then the rest upward
            (blocks[top : top + 1], deepest, base | deepest),
            (blocks[top - 1 :: -1] if top > 0 else (), size, base | size),
        )
        for run, s, packed in runs:
            seen = None  # the last old value read, and its size change: consecutive blocks of a
            delta = 0  # chain mostly hold one shared value (their last refresh's)
            for b in run:
                old = get(b)
                if old is None:
                    holders[b] = holders.get(b, 0) | bit
                    added += 1
                    tokens += s
                else:
                    move_to_end(b)
                    if old is not seen:
                        seen = old
                        delta = s - (old & _SIZE_MASK)
                    tokens += delta
                lru[b] = packed
        be.tokens = tokens
        self._entries += added

    def _fit(self, be: _Backend) -> None:
        if be.capacity is None or be.events:
            return
        while be.tokens > be.capacity and be.lru:
            self._evict_front(be)
            self.evicted_capacity += 1

    def _bound(self) -> None:
        if self._entries <= self.max_blocks:
            return
        target = self.max_blocks - max(1, self.max_blocks // 64)
        heap = [
            (next(iter(be.lru.values())) >> _SIZE_BITS, be.bit, be)
            for be in self._backends.values()
            if be.lru
        ]
        heapq.heapify(heap)
        while self._entries > target and heap:
            _, _, be = heap[0]
            self._evict_front(be)
            self.evicted_global += 1
            if be.lru:
                heapq.heapreplace(heap, (next(iter(be.lru.values())) >> _SIZE_BITS, be.bit, be))
            else:
                heapq.heappop(heap)

    def _evict_front(self, be: _Backend) -> int:
        """Drop the backend's least recently used entry; returns its tokens."""
        b, packed = be.lru.popitem(last=False)
        self._unhold(b, be.bit)
        size = packed & _SIZE_MASK
        be.tokens -= size
        self._entries -= 1
        return size

    def _remove(self, be: _Backend, b: int) -> bool:
        packed = be.lru.pop(b, None)
        if packed is None:
            return False
        if b not in be.pending:  # a request is still computing it: it stays matched
            self._unhold(b, be.bit)
        be.tokens -= packed & _SIZE_MASK
        self._entries -= 1
        return True

    def _unhold(self, b: int, bit_index: int) -> None:
        mask = self._holders.get(b, 0) & ~(1 << bit_index)
        if mask:
            self._holders[b] = mask
        else:
            self._holders.pop(b, None)

    def _clear(self, be: _Backend) -> None:
        for b in be.pending:
            if b not in be.lru:
                self._unhold(b, be.bit)
        be.pending.clear()
        for b in be.lru:
            self._unhold(b, be.bit)
        self._entries -= len(be.lru)
        be.lru.clear()
        be.tokens = 0


def _check_block_tokens(block_tokens: int) -> None:
    if not 0 < block_tokens <= _SIZE_MASK:
        raise ValueError(f"block_tokens must be in 1..{_SIZE_MASK}")


def _last_block_size(n_blocks: int, block_tokens: int, prompt_tokens: int | None) -> int:
    if prompt_tokens is None:
        return block_tokens
    rest = prompt_tokens - (n_blocks - 1) * block_tokens
    return rest if 0 < rest <= block_tokens else block_tokens
