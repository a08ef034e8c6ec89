"""A backend's KV events -> its entries in the prefix index, exactly as the engine caches them.

SGLang publishes what its radix cache stores and evicts (`backends/sglang_kv.py` decodes the
wire). Its block hashes are its own, so the router cannot look requests up by them; but each
`KVStored` carries the block's token ids. With the model's own tokenizer at the engine's page
size, the router's blocks are the engine's pages, and the router's chained hash of a stored
page (its parent's router hash, its tokens) is the hash a request with that prefix computes.
The mirror keeps engine hash -> router hashes, so a `KVRemoved` or a later child finds them;
the mapping never needs SGLang's hash function.

One engine page becomes one router entry per seed: the router salts its chains by model name
(chat/completions name one, /generate does not) and by text vs token-id prompts, and an
event says nothing about which the request was, so every seed in use gets the page.

Events the mirror cannot place: a page whose parent it never saw (a subscriber that joined
late, or a lost batch) and pages of another size. They are counted, not guessed; the caller
drops event-driven state and falls back to the modelled cache when sequence numbers jump.
Only the device tier (`medium` GPU or unset) is mirrored: that is what `cached_tokens` counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.core.blocks import chain_hashes
from router.core.index import PrefixIndex

__all__ = ["EventMirror", "KVCleared", "KVEvent", "KVRemoved", "KVStored"]

_DEVICE = (None, "GPU")


@dataclass(frozen=True, slots=True, kw_only=True)
class KVStored:
    """The engine cached these pages, in order, after the page `parent_block_hash`."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KVRemoved:
    """The engine evicted these pages."""

    block_hashes: tuple[int, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KVCleared:
    """The engine dropped its whole cache (`/flush_cache`)."""


KVEvent = KVStored | KVRemoved | KVCleared


class EventMirror:
    """One backend's event stream applied to its index entries (event-driven mode)."""

    def __init__(
        self, index: PrefixIndex, backend: str, *, seeds: Sequence[int], block_tokens: int
    ) -> None:
        if not seeds:
            raise ValueError("at least one seed is needed")
        if block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        self.index = index
        self.backend = backend
        self.seeds = tuple(seeds)
        self.block_tokens = block_tokens
        self._hashes: dict[int, tuple[int, ...]] = {}  # engine hash -> router hash per seed
        self.stored_pages = 0
        self.removed_pages = 0
        self.orphan_pages = 0  # stored after a parent never seen
        self.skipped_pages = 0  # another page size, another tier, or malformed

    def start(self) -> None:
        """Event-driven entries from empty (modelled beliefs and earlier events are dropped)."""
        self._hashes.clear()
        self.index.set_event_driven(self.backend, True)
        self.index.clear_backend(self.backend)

    def stop(self) -> None:
        """Back to the modelled cache (event-driven entries are dropped)."""
        self._hashes.clear()
        self.index.set_event_driven(self.backend, False)

    def apply(self, event: KVEvent, now: float) -> None:
        if isinstance(event, KVStored):
            self._stored(event, now)
        elif isinstance(event, KVRemoved):
            self._removed(event)
        else:
            self._hashes.clear()
            self.index.clear_backend(self.backend)

    def _stored(self, event: KVStored, now: float) -> None:
        n = len(event.block_hashes)
        size = self.block_tokens
        if (
            event.medium not in _DEVICE
            or event.block_size != size
            or len(event.token_ids) != n * size
        ):
            self.skipped_pages += n
            return
        if event.parent_block_hash is None:
            parents: tuple[int, ...] = self.seeds
        else:
            known = self._hashes.get(event.parent_block_hash)
            if known is None:
                self.orphan_pages += n
                return
            parents = known
        chains = [chain_hashes(event.token_ids, size, p) for p in parents]
        for i, engine_hash in enumerate(event.block_hashes):
            self._hashes[engine_hash] = tuple(chain[i] for chain in chains)
        for chain in chains:
            self.index.apply_stored(self.backend, chain, now)
        self.stored_pages += n

    def _removed(self, event: KVRemoved) -> None:
        if event.medium not in _DEVICE:
            self.skipped_pages += len(event.block_hashes)
            return
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            ours = self._hashes.pop(engine_hash, None)
            if ours is not None:
                gone.extend(ours)
                self.removed_pages += 1
        if gone:
            self.index.apply_removed(self.backend, gone)
