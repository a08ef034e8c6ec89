"""What goes into and comes out of the simulated engine (`engine.Engine`).

The engine is sans-IO: callers hand it requests and the current time, and drain events.
The virtual-time simulator and the real-time HTTP server (`server.py`) drive the same engine.

A prompt is a chain of cache units ("pages"): `blocks[i]` identifies the prompt's content up
to and including unit i (chained, so equal id at depth i means equal prefix). Every unit holds
`block_size` tokens except the last, which holds the remainder::

    prompt_tokens = n, block_size = B, k = len(blocks) = ceil(n / B)
    | unit 0: B | unit 1: B | ... | unit k-1: n - (k-1)B |

Mooncake traces give such ids directly (B = 512); the HTTP server hashes token ids in pages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Aborted",
    "EngineEvent",
    "EngineLoad",
    "Finished",
    "FirstToken",
    "ProbeResult",
    "SimRequest",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimRequest:
    rid: str
    blocks: tuple[int, ...]
    block_size: int
    prompt_tokens: int
    output_tokens: int  # tokens to generate (>= 1); the first comes out of prefill
    # SGLang's per-request `priority` (higher first); only an engine run with
    # `enable_priority_scheduling` reads it, and None then means the lowest.
    priority: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.prompt_tokens <= 0:
            raise ValueError("prompt_tokens must be positive")
        expected = -(-self.prompt_tokens // self.block_size)
        if len(self.blocks) != expected:
            raise ValueError(
                f"{len(self.blocks)} blocks cannot hold {self.prompt_tokens} tokens "
                f"at {self.block_size} per block (need {expected})"
            )
        if self.output_tokens < 1:
            raise ValueError("output_tokens must be >= 1")

    def unit_tokens(self, i: int) -> int:
        """Tokens in unit i (the last unit may be partial)."""
        if i < len(self.blocks) - 1:
            return self.block_size
        return self.prompt_tokens - self.block_size * (len(self.blocks) - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstToken:
    """Prefill finished and the first output token exists: TTFT = time - arrival."""

    rid: str
    time: float
    cached_tokens: int  # prompt tokens not recomputed (device hits + host-tier loads)
    host_loaded_tokens: int = 0  # the part of cached_tokens loaded back from the host tier


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    rid: str
    time: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    first_token_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Aborted:
    rid: str
    time: float


EngineEvent = FirstToken | Finished | Aborted


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """What the cache would give a prompt right now (no LRU touch): for the oracle and tests."""

    device_tokens: int
    host_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLoad:
    """The engine's load, as SGLang's /get_load reports it, plus queued prefill work."""

    running: int
    waiting: int
    waiting_prefill_tokens: int  # uncached prompt tokens not yet prefilled (queued + in progress)
    kv_used_tokens: int
    kv_capacity_tokens: int
