"""Prefill-only and decode-only engines, and the link that moves KV between them (PD mode).

SGLang's PD disaggregation splits one request across two servers:

* the **prefill server** computes the prompt and the first token, keeps the prompt's KV in its
  radix cache (so later requests sharing the prefix hit it) and sends the KV to the decode
  server. Here: the ordinary `Engine` given the request with one output token, so it finishes
  at its first token and leaves the prompt cached.
* the **link**: a prompt's KV is `prompt_tokens x kv_bytes_per_token` bytes; each prefill
  server sends one transfer at a time over its own link (FIFO), at the link's bandwidth.
* the **decode server** first *preallocates* the request's KV (prompt plus the whole output)
  in first-come, first-served order, a request waiting until it fits with nothing behind it
  going first (`PreallocQueue`, SGLang's DecodePreallocQueue); only then does the prefill
  server start: SGLang's prefill server keeps a request in its bootstrap queue until the
  decode side's handshake and preallocation are done (disaggregation/prefill.py, decode.py).
  When the KV has landed, the request joins the decode batch at the next step, which emits the
  first token the client sees; then it decodes the rest. Here: an `Engine` whose prefill
  compute costs nothing (the KV arrived by transfer) and whose chunk budget takes any prompt
  at once, so "prefilling" a transferred request is one decode step of the batch with the
  request joined, admitted on its preallocated room. Each request gets a unit of its own in the
  decode cache, so no prefix is shared there: the whole prompt is transferred and held.

Simplifications: the prefill server frees the request's KV (keeps it only as evictable cache)
at once instead of after the transfer; the handshake itself takes no time; links do not share
bandwidth between concurrent transfers, they queue them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque

from backends.sim.api import SimRequest
from backends.sim.engine import Engine, EngineConfig
from backends.sim.perf import Profile

__all__ = ["KVLink", "PreallocQueue", "decode_engine", "decode_request", "prefill_engine"]

# "Free" prefill on a decode server: compute so fast that a prompt's FLOPs take no time.
_FREE_FLOPS = 1e30
_ANY_PROMPT = 1 << 40
_unit_ids = itertools.count(1 << 62)  # decode-side cache units: never equal to a prompt's


def prefill_engine(profile: Profile, config: EngineConfig | None = None) -> Engine:
    """A prefill server: the plain engine; give it requests with `output_tokens=1`."""
    return Engine(profile, config)


def decode_engine(profile: Profile, config: EngineConfig | None = None) -> Engine:
    """A decode server: joins transferred requests to its batch; prefill compute is free."""
    base = config if config is not None else EngineConfig()
    cfg = dataclasses.replace(
        base, chunked_prefill_size=_ANY_PROMPT, max_prefill_tokens=_ANY_PROMPT
    )
    free = dataclasses.replace(profile, peak_flops=_FREE_FLOPS, mfu=1.0, host_capacity_tokens=0)
    return Engine(free, cfg)


def decode_request(rid: str, prompt_tokens: int, output_tokens: int) -> SimRequest:
    """The decode server's copy of a request: the whole prompt as one unit of its own."""
    return SimRequest(
        rid=rid,
        blocks=(next(_unit_ids),),
        block_size=prompt_tokens,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
    )


class KVLink:
    """One server's link: transfers go one at a time, in the order they were sent."""

    def __init__(self, bytes_per_s: float, kv_bytes_per_token: int) -> None:
        if not bytes_per_s > 0 or kv_bytes_per_token <= 0:
            raise ValueError("a link needs a positive bandwidth and KV size")
        self.bytes_per_s = bytes_per_s
        self.kv_bytes_per_token = kv_bytes_per_token
        self.free_at = 0.0

    def duration_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.bytes_per_s

    def send(self, tokens: int, now: float) -> float:
        """Queue a transfer of `tokens` tokens' KV at `now`; when it arrives."""
        start = max(now, self.free_at)
        self.free_at = start + self.duration_s(tokens)
        return self.free_at


class PreallocQueue:
    """A decode server's preallocation queue: KV room for a request before its prefill runs.

    First come, first served: the head preallocates its prompt plus whole output as soon as
    that fits the decode engine's pool; nothing behind it goes first (SGLang's
    `pop_preallocated` stops at the first request that does not fit). Call `pump` whenever
    room may have freed (after the engine's events); it returns the requests whose prefill may
    now start, in order.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: deque[tuple[str, int]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, rid: str, prompt_tokens: int, output_tokens: int) -> bool:
        """Queue `rid`; False if it can never fit this server's pool (abort it instead)."""
        tokens = prompt_tokens + output_tokens
        if tokens > self.engine.cache.capacity_tokens:
            return False
        self._queue.append((rid, tokens))
        return True

    def pump(self, now: float) -> list[str]:
        """Preallocate from the head while it fits; the rids preallocated now."""
        ready: list[str] = []
        queue = self._queue
        while queue and self.engine.preallocate(queue[0][0], queue[0][1], now):
            ready.append(queue.popleft()[0])
        return ready

    def cancel(self, rid: str) -> None:
        """Forget `rid`, queued or preallocated (its request will not come)."""
        if not self.engine.release_preallocation(rid):
            for i, (queued, _) in enumerate(self._queue):
                if queued == rid:
                    del self._queue[i]
                    break
