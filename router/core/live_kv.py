"""The KV memory a backend's in-flight requests hold, a shared prefix counted once.

The core's `BackendState.decoding_kv_tokens` counts each decoding request's whole context,
which is what a decode step reads; what the requests *occupy* is less wherever they share a
prefix (the engine's radix cache keeps one copy). The scheduler asks how full a backend is
(`Scheduler` keeps an engine queue deep only while the engine has KV room to start it), and
on prefix-heavy traffic the per-request sum reads a backend fuller than it is (multi-turn
seed 2 on 16 backends: over capacity where the engines held 60-80%).

Blocks of the in-flight requests' prompts are reference-counted per backend (`add` when a
request is routed, `remove` when it ends); outputs are counted per request from the first
token on, as the core estimates them. Only the policy that owns one feeds it. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LiveKV"]


@dataclass(slots=True)
class _Backend:
    blocks: dict[int, int] = field(default_factory=dict)  # block hash -> requests holding it
    block_tokens: int = 1
    decoding_prompt_tokens: int = 0  # prompts of the decoding requests (their KV is in blocks)


class LiveKV:
    """Unique prompt blocks of each backend's in-flight requests, plus their outputs."""

    def __init__(self) -> None:
        self._backends: dict[str, _Backend] = {}
        self._decoding: dict[str, tuple[str, int]] = {}  # rid -> (backend, prompt tokens)

    def add(self, backend: str, blocks: tuple[int, ...], block_tokens: int) -> None:
        be = self._backends.get(backend)
        if be is None:
            be = self._backends[backend] = _Backend()
        be.block_tokens = block_tokens
        held = be.blocks
        for block in blocks:
            held[block] = held.get(block, 0) + 1

    def first_token(self, rid: str, backend: str, prompt_tokens: int) -> None:
        be = self._backends.get(backend)
        if be is None or rid in self._decoding:
            return
        be.decoding_prompt_tokens += prompt_tokens
        self._decoding[rid] = (backend, prompt_tokens)

    def remove(self, rid: str, backend: str, blocks: tuple[int, ...]) -> None:
        be = self._backends.get(backend)
        if be is None:
            return
        held = be.blocks
        for block in blocks:
            count = held.get(block, 0)
            if count > 1:
                held[block] = count - 1
            elif count:
                del held[block]
        decoding = self._decoding.pop(rid, None)
        if decoding is not None:
            be.decoding_prompt_tokens -= decoding[1]

    def forget_backend(self, backend: str) -> None:
        self._backends.pop(backend, None)
        self._decoding = {r: v for r, v in self._decoding.items() if v[0] != backend}

    def tokens(self, backend: str, decoding_kv_tokens: int) -> int:
        """KV tokens `backend`'s in-flight requests hold: their unique prompt blocks plus the
        outputs so far (`decoding_kv_tokens`, the core's per-request context sum, less the
        decoding requests' prompts)."""
        be = self._backends.get(backend)
        if be is None:
            return decoding_kv_tokens
        outputs = max(0, decoding_kv_tokens - be.decoding_prompt_tokens)
        return len(be.blocks) * be.block_tokens + outputs
