"""KV cache events of the simulated engine, shaped like SGLang's (`srt/disaggregation/kv_events`).

SGLang publishes, over ZMQ in msgpack, batches of `BlockStored` (blocks now cached, with the
hash of the block before them), `BlockRemoved` (blocks evicted) and `AllBlocksCleared` (cache
flushed). The radix cache records the same three facts when asked to (`RadixCache(...,
record_events=True)`), and `Engine.take_kv_events()` drains them. Here a "block" is one cache
unit, so its hash is the request's chained unit id (see `api.py`). `medium` says which tier the
fact is about ("GPU" = device pool, "CPU" = HiCache host pool); moving a unit from GPU to CPU is
a `BlockRemoved` on GPU plus a `BlockStored` on CPU. Wire encoding is the server's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "KVEvent", "Medium"]

Medium = Literal["GPU", "CPU"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None  # None: the blocks start the prompt
    token_counts: tuple[int, ...]  # tokens held by each block (the last may be partial)
    medium: Medium = "GPU"

    def __post_init__(self) -> None:
        if len(self.block_hashes) != len(self.token_counts):
            raise ValueError("block_hashes and token_counts differ in length")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: Medium = "GPU"


@dataclass(frozen=True, slots=True, kw_only=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
