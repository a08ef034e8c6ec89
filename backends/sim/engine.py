"""A sans-IO SGLang-like engine: continuous batching, chunked prefill, event-driven time.

The caller owns the clock. It hands in requests (`add_request(req, now)`), moves time forward
(`advance(now)`) and drains the events that happened by then (FirstToken, Finished, Aborted, in
time order). The virtual-time simulator jumps from arrival to arrival; the HTTP server calls
`advance` every few milliseconds. Both see the same results: `advance` only ever commits steps
that *ended* by `now`, and the step under way is fixed when it starts, so how often it is
called changes nothing (tested).

**Steps.** The engine runs one step at a time, composed at the previous step's end:

* A *prefill* step carries prefill chunks: first the request already being prefilled, then
  newly admitted requests from the waiting queue, each chunk <= `chunked_prefill_size` and the
  step's total <= `max_prefill_tokens`. A request cut short becomes the one chunked request and
  admission stops (SGLang keeps at most one chunked request). The step is *mixed*: every
  running decode also produces one token in it (SGLang --enable-mixed-chunk, vLLM's chunked
  prefill), so a long prompt does not freeze running streams. Its time is
  ``step_overhead + sum(prefill_time(chunk, context)) + host loads + decode read time``.
  The first output token exists when a request's last chunk completes (FirstToken).
* A *decode segment* when there is nothing to prefill: the batch is fixed until its earliest
  finish, and step k reads ``kv0 + k * batch`` KV tokens, so the time of m steps is closed
  form: ``T(m) = m * (a + c * kv0) + c * batch * m * (m - 1) / 2``. The engine jumps straight to
  the earliest finish. An arrival (or abort) during a segment cuts it at the first step
  boundary after that moment, where the next step is composed with the newcomer.

A global decode-step counter `g` makes progress O(1): a request that entered decode at `g0`
has produced ``1 + g - g0`` tokens and finishes when ``g = g0 + output_tokens - 1``; a heap of
those finish steps gives the earliest finish.

**Priority** (opt-in, as SGLang 0.5.23's `--enable-priority-scheduling`, read in its
`managers/schedule_policy.py` and `managers/scheduler.py`): with the fcfs policy the waiting
queue is sorted by (priority, higher first; arrival) before each prefill step
(`_sort_by_priority_and_fcfs`); a request without one gets the lowest priority
(`_set_or_validate_priority`: -sys.maxsize - 1); the chunked request in progress still goes
first; SGLang refuses priority scheduling with lpm (fcfs or lof only), so does this engine.
Not modelled: SGLang's priority preemption, which retracts a running request for a waiting
one only when the batch is full and the priorities differ by more than
`--priority-scheduling-preemption-threshold` (default 10).

**Admission and memory.** The waiting queue is FCFS, or LPM (longest cached prefix first, ties
by arrival; like SGLang, LPM falls back to FCFS when more than `lpm_max_queue` wait). The head
is admitted while running < `max_running_requests` and its KV fits: the cached prefix is locked,
and the request reserves its uncached prompt *and its whole output* up front, evicting LRU
cache leaves if needed. SGLang instead admits on an estimated output ratio and retracts
requests when memory runs out; reserving the output means no retraction ever happens here, at
the price of admitting somewhat fewer requests under memory pressure. When the head does not
fit, nothing behind it is admitted (no skipping, as in SGLang). A prompt found in the host
tier is copied back when admitted; the copy time is charged to the step that carries its first
chunk. The prompt's units enter the radix cache when its prefill completes (SGLang also inserts
chunk by chunk); output tokens are not cached (their ids are unknown), their KV is freed at the
finish. A request whose prompt plus output cannot fit the device pool even when empty is
aborted on arrival.

`max_running_requests` defaults to 256. SGLang derives its cap from the token pool (thousands
for an 8B model on an H100) and captures CUDA graphs up to a batch of about 160-256; with whole
outputs reserved the KV pool, not this cap, binds first for long prompts.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Literal

from backends.sim.api import (
    Aborted,
    EngineEvent,
    EngineLoad,
    Finished,
    FirstToken,
    ProbeResult,
    SimRequest,
)
from backends.sim.kvevents import KVEvent
from backends.sim.perf import Profile
from backends.sim.radix import RadixCache, RadixNode

__all__ = ["Engine", "EngineConfig"]

_WAITING, _PREFILL, _DECODE, _DONE = 0, 1, 2, 3


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Scheduler knobs, named and defaulted as SGLang's server arguments."""

    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    page_size: int = 1  # informational: the cache works in the request's units (api.py)
    lpm_max_queue: int = 128  # LPM sorts only queues up to this long (SGLang: 128)
    enable_kv_events: bool = False
    # SGLang's --enable-priority-scheduling: the waiting queue by (priority desc, arrival).
    enable_priority_scheduling: bool = False

    def __post_init__(self) -> None:
        for name in ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.page_size <= 0:
            raise ValueError("page_size must be positive")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(
                f"schedule_policy must be 'fcfs' or 'lpm', not {self.schedule_policy!r}"
            )
        if self.enable_priority_scheduling and self.schedule_policy != "fcfs":
            raise ValueError("priority scheduling needs schedule_policy 'fcfs' (as SGLang's)")


class _Req:
    """One live request's mutable state (private to the engine)."""

    __slots__ = (
        "aborted",
        "arrival",
        "cached",
        "est_new",
        "est_prefill_s",
        "finish_g",
        "first_token_time",
        "g0",
        "held",
        "host_load_s",
        "host_loaded",
        "lock_node",
        "new_total",
        "prefilled",
        "req",
        "reserved",
        "sizes",
        "state",
    )

    def __init__(self, req: SimRequest, arrival: float) -> None:
        self.req = req
        self.arrival = arrival
        n, k, b = req.prompt_tokens, len(req.blocks), req.block_size
        self.sizes = [b] * k
        self.sizes[-1] = n - b * (k - 1)
        self.state = _WAITING
        self.aborted = False
        self.cached = 0
        self.host_loaded = 0
        self.host_load_s = 0.0
        self.new_total = n
        self.prefilled = 0
        self.reserved = 0
        self.held = 0  # tokens preallocated before it arrived (a PD decode server's KV)
        self.lock_node: RadixNode | None = None
        self.g0 = 0
        self.finish_g = 0
        self.first_token_time = 0.0
        self.est_new = n
        self.est_prefill_s = 0.0


@dataclass(slots=True, kw_only=True)
class _Step:
    """The step under way: composed at `start`, its effects land at `end`."""

    start: float
    end: float
    chunks: list[tuple[_Req, int]]  # prefill step: (request, chunk tokens)
    decode: bool  # running decodes advance (one token per step)
    steps: int  # decode steps taken: 1 for a prefill step that decodes, m for a segment
    segment: bool  # a decode-only segment (cut short by arrivals and aborts)
    a0: float = 0.0  # segment: first step's time
    quad: float = 0.0  # segment: c * batch / 2


class Engine:
    """The simulated SGLang engine; see the module docstring for the model."""

    def __init__(self, profile: Profile, config: EngineConfig | None = None) -> None:
        self.profile = profile
        self.config = config if config is not None else EngineConfig()
        self._cache = RadixCache(
            profile.kv_capacity_tokens,
            profile.host_capacity_tokens,
            record_events=self.config.enable_kv_events,
        )
        self._a, self._c = profile.decode_coefficients()
        self._now = 0.0
        self._live: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._waiting_new = 0  # est. uncached tokens queued
        self._waiting_prefill_s = 0.0
        self._prefilling: list[_Req] = []
        self._decoding: dict[str, _Req] = {}
        self._kv_base = 0  # sum over decoding of prompt + 1 - g0: batch KV = base + batch * g
        self._g = 0
        self._finish_heap: list[tuple[int, int, _Req]] = []
        self._seq = itertools.count()
        self._step: _Step | None = None
        self._outbox: list[EngineEvent] = []
        self._held: dict[str, int] = {}  # rid -> tokens preallocated, request not yet added

    # -- the caller's interface ------------------------------------------------------------

    @property
    def cache(self) -> RadixCache:
        """The radix cache (read it; do not change it behind the engine's back)."""
        return self._cache

    @property
    def now(self) -> float:
        """The latest time the engine has been told about."""
        return self._now

    def preallocate(self, rid: str, tokens: int, now: float) -> bool:
        """Hold `tokens` of the device pool for a request that will arrive later; False (and
        nothing held) when they do not fit even after evicting cache.

        A PD decode server preallocates a request's KV before its prefill server computes it
        (SGLang's DecodePreallocQueue); the request, added later under the same rid, is
        admitted on that room. `release_preallocation` gives it back unused.
        """
        self._advance_to(now)
        if rid in self._held or rid in self._live:
            raise ValueError(f"request {rid!r} already holds room or is live")
        if tokens < 0 or not self._cache.make_room(tokens):
            return False
        self._cache.reserve(tokens)
        self._held[rid] = tokens
        return True

    def release_preallocation(self, rid: str) -> bool:
        """Give back a preallocation whose request will not come; False if none is held."""
        tokens = self._held.pop(rid, None)
        if tokens is None:
            return False
        self._cache.release(tokens)
        return True

    def add_request(self, req: SimRequest, now: float) -> None:
        """A request arrives at `now`. Duplicate live rids are a ValueError."""
        self._advance_to(now)
        if req.rid in self._live:
            raise ValueError(f"duplicate request id {req.rid!r}")
        if req.prompt_tokens + req.output_tokens > self._cache.capacity_tokens:
            self.release_preallocation(req.rid)
            self._outbox.append(Aborted(rid=req.rid, time=now))
            return
        r = _Req(req, now)
        r.held = self._held.pop(req.rid, 0)
        probe = self._cache.match(req.blocks, r.sizes)
        r.est_new = req.prompt_tokens - probe.tokens
        r.est_prefill_s = self.profile.prefill_time(r.est_new, req.prompt_tokens)
        self._live[req.rid] = r
        self._waiting.append(r)
        self._waiting_new += r.est_new
        self._waiting_prefill_s += r.est_prefill_s
        self._kick(now)

    def abort(self, rid: str, now: float) -> bool:
        """Abort a live request at `now` (Aborted event); False if unknown or already over."""
        self._advance_to(now)
        r = self._live.get(rid)
        if r is None or r.aborted:
            return False
        r.aborted = True
        self._outbox.append(Aborted(rid=rid, time=now))
        if r.state == _WAITING:
            self._waiting.remove(r)
            self._waiting_new -= r.est_new
            self._waiting_prefill_s -= r.est_prefill_s
            self._cache.release(r.held)
            r.held = 0
            del self._live[rid]
            r.state = _DONE
        elif not self._in_step(r):
            self._free(r)
        # else: it leaves at the end of the step under way (a segment is cut for it)
        self._kick(now)
        return True

    def advance(self, now: float) -> list[EngineEvent]:
        """Run the engine up to `now`; the events that happened by then, in time order."""
        self._advance_to(now)
        events, self._outbox = self._outbox, []
        return events

    def next_event_time(self) -> float | None:
        """The next step boundary, where a FirstToken or Finished may happen; None if idle.

        A lower bound: a step may end with no event (a middle prefill chunk), so call again.
        """
        return self._step.end if self._step is not None else None

    def progress(self, rid: str, now: float) -> int:
        """Output tokens of a live request produced by `now` (call `advance(now)` first)."""
        r = self._live.get(rid)
        if r is None:
            raise KeyError(f"no live request {rid!r}")
        if r.state != _DECODE:
            return 0
        return min(r.req.output_tokens, 1 + self._g_at(now) - r.g0)

    def batch_kv_tokens(self) -> int:
        """KV tokens a decode step reads now: each decoding request's prompt and output so far.

        Less than `load().kv_used_tokens`, which also counts reserved output not yet written.
        """
        return self._kv_base + len(self._decoding) * self._g_at(self._now)

    def probe(self, req: SimRequest) -> ProbeResult:
        """The cache hit `req` would get now (device, then host), touching nothing."""
        sizes = [req.unit_tokens(i) for i in range(len(req.blocks))]
        m = self._cache.match(req.blocks, sizes)
        return ProbeResult(device_tokens=m.device_tokens, host_tokens=m.host_tokens)

    def load(self) -> EngineLoad:
        """SGLang-style load: used KV is what is not free and not evictable cache."""
        in_progress = sum(r.new_total - r.prefilled for r in self._prefilling)
        return EngineLoad(
            running=len(self._prefilling) + len(self._decoding),
            waiting=len(self._waiting),
            waiting_prefill_tokens=self._waiting_new + in_progress,
            kv_used_tokens=self._cache.protected_tokens + self._cache.reserved_tokens,
            kv_capacity_tokens=self._cache.capacity_tokens,
        )

    def predicted_wait_s(self, now: float) -> float:
        """Time until a request arriving at `now` would start its prefill.

        The rest of the step under way, then the queued prefill work (chunks of at most
        `max_prefill_tokens` per step, each step also carrying the current decode batch).
        Ignores waits for KV room or a running slot.
        """
        step = self._step
        if step is None:
            return 0.0
        if step.segment:
            done = self._segment_steps_by(step, now - step.start)
            boundary = step.start + self._segment_time(step, min(done + 1, step.steps))
        else:
            boundary = step.end
        wait = max(0.0, boundary - now)
        in_step = {id(r): c for r, c in step.chunks}
        tokens = self._waiting_new
        seconds = self._waiting_prefill_s
        for r in self._prefilling:
            left = r.new_total - r.prefilled - in_step.get(id(r), 0)
            if left > 0:
                tokens += left
                seconds += self.profile.prefill_time(left, r.req.prompt_tokens)
        if tokens <= 0:
            return wait
        n_steps = -(-tokens // self.config.max_prefill_tokens)
        per_step = self.profile.step_overhead_s
        if self._decoding:
            per_step += self.profile.decode_read_time(self._batch_kv())
        return wait + seconds + n_steps * per_step

    def flush_cache(self) -> bool:
        """Drop the whole cache, as SGLang's /flush_cache: only when no request is live."""
        if self._live:
            return False
        return self._cache.reset()

    def take_kv_events(self) -> list[KVEvent]:
        """Drain BlockStored/BlockRemoved/AllBlocksCleared (config.enable_kv_events)."""
        return self._cache.take_events()

    def check(self) -> None:
        """Recount the engine's books and raise AssertionError on drift (for tests)."""
        self._cache.check()
        live = [r for r in self._live.values()]
        held = sum(r.held for r in live) + sum(self._held.values())
        assert sum(r.reserved for r in live) + held == self._cache.reserved_tokens
        assert sum(r.req.prompt_tokens + 1 - r.g0 for r in self._decoding.values()) == self._kv_base
        assert len(self._waiting) + len(self._prefilling) + len(self._decoding) == len(live)

    # -- time ------------------------------------------------------------------------------

    def _advance_to(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now
        while self._step is not None and self._step.end <= now:
            step, self._step = self._step, None
            self._commit(step)
            self._compose(step.end)

    def _kick(self, now: float) -> None:
        """Something changed at `now`: start a step if idle, or cut a decode segment short."""
        step = self._step
        if step is None:
            self._compose(now)
        elif step.segment:
            done = self._segment_steps_by(step, now - step.start)
            if done + 1 < step.steps:
                step.steps = done + 1
                step.end = step.start + self._segment_time(step, step.steps)

    @staticmethod
    def _segment_time(step: _Step, m: int) -> float:
        return m * step.a0 + step.quad * m * (m - 1)

    def _segment_steps_by(self, step: _Step, elapsed: float) -> int:
        """Decode steps of a segment completed `elapsed` seconds after it started."""
        if elapsed <= 0:
            return 0
        a, b = step.quad, step.a0 - step.quad  # T(m) = a m^2 + b m
        m = int(elapsed / b) if a == 0 else int((-b + math.sqrt(b * b + 4 * a * elapsed)) / (2 * a))
        m = max(0, min(m, step.steps))
        while m < step.steps and self._segment_time(step, m + 1) <= elapsed:
            m += 1
        while m > 0 and self._segment_time(step, m) > elapsed:
            m -= 1
        return m

    def _g_at(self, now: float) -> int:
        """The decode-step counter at `now`, counting the steps done in a segment under way."""
        step = self._step
        if step is not None and step.segment:
            return self._g + self._segment_steps_by(step, now - step.start)
        return self._g

    def _batch_kv(self) -> int:
        return self._kv_base + len(self._decoding) * self._g

    # -- composing and committing steps ----------------------------------------------------

    def _compose(self, t: float) -> None:
        assert self._step is None
        chunks, host_s = self._schedule_prefill(t)
        batch = len(self._decoding)
        if chunks:
            dur = self.profile.step_overhead_s + host_s
            for r, chunk in chunks:
                ctx = r.cached + r.prefilled + chunk
                dur += self.profile.prefill_time(chunk, ctx)
            if batch:
                dur += self.profile.decode_read_time(self._batch_kv())
            self._step = _Step(
                start=t, end=t + dur, chunks=chunks, decode=batch > 0, steps=1, segment=False
            )
        elif batch:
            m = self._steps_to_next_finish()
            step = _Step(
                start=t,
                end=t,
                chunks=[],
                decode=True,
                steps=m,
                segment=True,
                a0=self._a + self._c * self._batch_kv(),
                quad=self._c * batch / 2,
            )
            step.end = t + self._segment_time(step, m)
            self._step = step

    def _steps_to_next_finish(self) -> int:
        heap = self._finish_heap
        while heap and heap[0][2].state != _DECODE:
            heapq.heappop(heap)
        assert heap, "decoding requests always have a finish step"
        return max(1, heap[0][0] - self._g)

    def _schedule_prefill(self, t: float) -> tuple[list[tuple[_Req, int]], float]:
        cfg = self.config
        budget = cfg.max_prefill_tokens
        chunks: list[tuple[_Req, int]] = []
        for r in self._prefilling:
            chunk = min(r.new_total - r.prefilled, cfg.chunked_prefill_size, budget)
            if chunk <= 0:
                return chunks, 0.0
            chunks.append((r, chunk))
            budget -= chunk
            if r.prefilled + chunk < r.new_total:
                return chunks, 0.0  # still the chunked request: nothing else joins
        host_s = 0.0
        if not self._waiting or budget <= 0:
            return chunks, host_s
        for r in self._queue_order():
            if budget <= 0:
                break
            if len(self._prefilling) + len(self._decoding) >= cfg.max_running_requests:
                break
            if not self._admit(r, t):
                break
            chunk = min(r.new_total, cfg.chunked_prefill_size, budget)
            chunks.append((r, chunk))
            host_s += r.host_load_s
            budget -= chunk
            if chunk < r.new_total:
                break
        return chunks, host_s

    def _queue_order(self) -> list[_Req]:
        queue = list(self._waiting)
        if self.config.enable_priority_scheduling and len(queue) > 1:
            lowest = -sys.maxsize - 1
            # stable sort: equal priorities keep arrival order (SGLang: wait_queue_entry_time)
            queue.sort(key=lambda r: -(lowest if r.req.priority is None else r.req.priority))
            return queue
        if self.config.schedule_policy == "lpm" and 1 < len(queue) <= self.config.lpm_max_queue:
            cache = self._cache
            hits = {id(r): cache.match(r.req.blocks, r.sizes).tokens for r in queue}
            queue.sort(key=lambda r: -hits[id(r)])  # stable: ties keep arrival order
        return queue

    def _admit(self, r: _Req, t: float) -> bool:
        cache = self._cache
        n, out = r.req.prompt_tokens, r.req.output_tokens
        m = cache.match(r.req.blocks, r.sizes)
        cache.lock(m.last_node)
        uncached = n - m.tokens
        cache.release(r.held)  # its preallocated room, taken again just below
        if not cache.make_room(m.host_load_tokens + uncached + out):
            cache.reserve(r.held)
            cache.unlock(m.last_node)
            return False
        r.held = 0
        loaded = cache.load_host(m)
        cache.touch(m.last_node, t)
        cache.reserve(uncached + out)
        self._waiting.remove(r)
        self._waiting_new -= r.est_new
        self._waiting_prefill_s -= r.est_prefill_s
        r.state = _PREFILL
        r.reserved = uncached + out
        r.lock_node = m.last_node
        r.cached = m.tokens
        r.host_loaded = m.host_tokens
        r.host_load_s = self.profile.host_load_time(loaded)
        r.new_total = uncached
        self._prefilling.append(r)
        return True

    def _commit(self, step: _Step) -> None:
        end = step.end
        if step.decode:
            self._g += step.steps
        for r in [r for r in self._decoding.values() if r.aborted]:
            self._free(r)
        heap = self._finish_heap
        while heap and (heap[0][2].state != _DECODE or heap[0][0] <= self._g):
            _, _, r = heapq.heappop(heap)
            if r.state == _DECODE:
                self._finish(r, end)
        for r, chunk in step.chunks:
            if r.aborted:
                self._free(r)
                continue
            r.prefilled += chunk
            if r.prefilled == r.new_total:
                self._complete_prefill(r, end)

    def _complete_prefill(self, r: _Req, end: float) -> None:
        cache = self._cache
        r.first_token_time = end
        self._outbox.append(
            FirstToken(
                rid=r.req.rid, time=end, cached_tokens=r.cached, host_loaded_tokens=r.host_loaded
            )
        )
        cache.release(r.new_total)
        r.reserved -= r.new_total
        res = cache.insert(r.req.blocks, r.sizes, end)
        cache.lock(res.last_node)
        if r.lock_node is not None:
            cache.unlock(r.lock_node)
        r.lock_node = res.last_node
        if r.req.output_tokens == 1:
            self._finish(r, end)  # the first token was the only one
            return
        self._prefilling.remove(r)
        r.state = _DECODE
        r.g0 = self._g
        r.finish_g = self._g + r.req.output_tokens - 1
        self._decoding[r.req.rid] = r
        self._kv_base += r.req.prompt_tokens + 1 - r.g0
        heapq.heappush(self._finish_heap, (r.finish_g, next(self._seq), r))

    def _finish(self, r: _Req, end: float) -> None:
        self._outbox.append(
            Finished(
                rid=r.req.rid,
                time=end,
                prompt_tokens=r.req.prompt_tokens,
                output_tokens=r.req.output_tokens,
                cached_tokens=r.cached,
                first_token_time=r.first_token_time,
            )
        )
        self._free(r)

    def _free(self, r: _Req) -> None:
        """Give back everything a request holds; it is no longer live."""
        if r.state == _DECODE:
            del self._decoding[r.req.rid]
            self._kv_base -= r.req.prompt_tokens + 1 - r.g0
        elif r.state == _PREFILL:
            self._prefilling.remove(r)
        if r.lock_node is not None:
            self._cache.unlock(r.lock_node)
            r.lock_node = None
        self._cache.release(r.reserved)
        r.reserved = 0
        r.state = _DONE
        self._live.pop(r.req.rid, None)

    def _in_step(self, r: _Req) -> bool:
        step = self._step
        if step is None:
            return False
        if r.state == _DECODE:
            return step.decode
        return any(c is r for c, _ in step.chunks)
