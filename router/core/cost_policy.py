"""`cost` (the default) and `oracle`: route each request where its predicted latency is lowest.

For backend b and a request with n prompt tokens and an expected N output tokens::

    cached_b  = tokens of the longest prefix b is believed to hold (PrefixIndex), < n
    queue_b   = work routed to b that has not produced its first token yet: each pending
                request's prefill at b's PP plus the decode step its prefill step carries (if b
                was decoding), minus the time b has been working through it since
    ttft_b    = queue_b + prefill_b(n - cached_b, context n) + (step_b if b is decoding)
    step_b    = b's decode step time with this request joined to its batch (TG)
    cost_b    = ttft_b + N * step_b + interference * decoding_b * prefill_b(...)
              + pending_interference * pending_b * min(prefill_b(...), queue_b)

(A prefill runs in a step that also advances b's running decodes, so when b is decoding the
first token comes one decode step after the prefill work; an idle b answers in the prefill.)

The interference term is what the request does to the streams already decoding on b: while
b prefills it, each of those streams waits (SGLang runs the prefill chunk in the same or a
separate step). The pending term is what it does to the first tokens of the `pending_b`
requests routed to b and not yet answered: chunked prefill fills each step's token budget
with the queue's chunks in order, so the newcomer's chunks share steps with theirs while any
of their work remains, and each is delayed by up to the newcomer's prefill, never by more
than the work left ahead of it (queue_b). TTFT is the metric, so it weighs 1 by default.

`queue_b` is the model's; where b is slower than the model says (its oldest pending request
is past its predicted first token: an admission wait for KV memory, a slow host, anything the
model lacks), the lateness is added to b's queue, so b pays for being late until it catches up.

Every speed is b's own `PerfModel`, starting from the backend's prior and calibrated online
from what b did. PP: each busy period of b's prefill queue (from a request reaching it empty to
its emptying, cut every 16 first-token steps) is one observation, the tokens b computed in it
(prompt minus reported `cached_tokens`) against its length less the decode share of its mixed
steps (`_BusyPeriod`). TG: each finished request's mean inter-token gap, net of the other
prefills that finished on b meanwhile, against the batch's KV size (`_PrefillLog`). What b
reports as cached corrects the index (feedback), so a prefix that b evicted stops attracting
requests. docs/architecture.md says why these estimators and not per-request TTFTs.

`oracle` uses the same formula with the truth: the engines' real cache (device and host
tier), their real queue wait, and their true profiles. It exists only in the simulator and
bounds what any router could reach with this cost function.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from router.core.cost import OutputLengthModel, PerfModel
from router.core.index import PrefixIndex
from router.core.live_kv import LiveKV
from router.core.model import (
    BackendSpec,
    BackendState,
    BasePolicy,
    Choice,
    Explanation,
    PerfPrior,
    RequestRecord,
    RouteRequest,
    attention_pairs,
)
from router.core.policies import register_policy

__all__ = ["CostConfig", "CostPolicy", "OraclePolicy", "OracleProbe"]

# A backend we know nothing about: Llama-3.1-8B on one H100 (`router.priors.prior_named(
# "llama3-8b-h100")`, rounded; the core may not import the profiles). Calibration corrects it.
DEFAULT_PRIOR = PerfPrior(
    prefill_tokens_per_s=30_800.0,
    prefill_s_per_token_ctx=1.06e-9,
    decode_step_s=0.00664,
    decode_s_per_kv_token=4.6e-8,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CostConfig:
    """Knobs of the cost policy. Defaults are set by mechanism, not fitted to one trace."""

    index_max_blocks: int = 1_000_000
    # Tokens per block for KV events that carry no size (requests carry their own).
    block_tokens: int = 64
    # Weight of the slowdown a prefill imposes on b's running streams (0 ignores it).
    interference: float = 0.25
    # Add to b's queue how far its oldest pending request is past its predicted first token.
    lateness: bool = True
    # PP is learned net of the decode share of mixed steps, and the queue counts that share
    # per pending request (docs/architecture.md). False: PP absorbs the decode share.
    net_decode: bool = True
    # Weight of the delay a prefill imposes on the first tokens of the requests pending on b
    # (chunked prefill runs it in the same steps as theirs; 1: as much as its own TTFT).
    pending_interference: float = 1.0
    # Use reported cached_tokens to correct the index, and observed timings to calibrate.
    feedback: bool = True
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.index_max_blocks <= 0:
            raise ValueError("index_max_blocks must be positive")
        if self.interference < 0:
            raise ValueError("interference must be non-negative")
        if self.pending_interference < 0:
            raise ValueError("pending_interference must be non-negative")


@dataclass(slots=True)
class _Backlog:
    """Prefill work routed to one backend that has not produced a first token yet.

    `work_s` was outstanding at time `since`; the backend burns it at one second per second.
    `due` holds when each pending request's first token was predicted, oldest first (FCFS:
    each request queues behind all earlier ones, so predictions grow in routing order).
    """

    pending: dict[str, float]
    due: dict[str, float] = field(default_factory=dict)
    work_s: float = 0.0
    since: float = 0.0

    def remaining(self, now: float) -> float:
        return max(0.0, self.work_s - max(0.0, now - self.since))

    def lateness(self, now: float) -> float:
        """How far the oldest pending request is past its predicted first token (0 if not)."""
        for due in self.due.values():
            return max(0.0, now - due)
        return 0.0

    def add(self, rid: str, prefill_s: float, now: float, due: float | None) -> None:
        """`due` None: the first token will not be seen (or is another replica's to see)."""
        self.work_s = self.remaining(now) + prefill_s
        self.since = now
        self.pending[rid] = prefill_s
        if due is not None:
            self.due[rid] = due

    def done(self, rid: str, now: float) -> None:
        self.due.pop(rid, None)
        if self.pending.pop(rid, None) is None:
            return
        # What is left is at most what is still queued (the finished one is out of it).
        self.work_s = min(self.remaining(now), sum(self.pending.values()))
        self.since = now


@dataclass(slots=True, kw_only=True)
class _Routed:
    queue_s: float
    prefill_s: float
    mixed_s: float  # the decode step sharing the prefill's step (0 if the backend was idle)
    kv_tokens: int
    fed_back: bool = False  # the backend's cached_tokens has been learned from

    @property
    def ttft_s(self) -> float:
        """The predicted time to first token, from routing."""
        return self.queue_s + self.prefill_s + self.mixed_s


class _PrefillLog:
    """When each prefill finished on a backend, and its size.

    A stream's mean inter-token gap includes the prefills that ran in its decode window (mixed
    steps); subtracting them leaves the decode step time that TG calibration wants. Sizes are
    kept, not seconds, so the subtraction uses the PP learned by then, not a stale guess.
    """

    __slots__ = ("new", "new_ctx", "times")

    def __init__(self, keep: int = 4096) -> None:
        self.times: deque[float] = deque(maxlen=keep)
        self.new: deque[int] = deque(maxlen=keep)  # cumulative new tokens
        self.new_ctx: deque[int] = deque(maxlen=keep)  # cumulative attention pairs

    def add(self, now: float, new_tokens: int, context_tokens: int) -> None:
        self.times.append(now)
        self.new.append((self.new[-1] if self.new else 0) + new_tokens)
        pairs = attention_pairs(new_tokens, context_tokens)
        self.new_ctx.append((self.new_ctx[-1] if self.new_ctx else 0) + pairs)

    def seconds_between(self, start: float, end: float, speeds: PerfPrior) -> float:
        """Prefill seconds (at `speeds`) of the prefills that finished in (start, end]."""
        new_end, ctx_end = self._upto(end)
        new_start, ctx_start = self._upto(start)
        return (new_end - new_start) / speeds.prefill_tokens_per_s + (
            ctx_end - ctx_start
        ) * speeds.prefill_s_per_token_ctx

    def _upto(self, t: float) -> tuple[int, int]:
        i = bisect_right(self.times, t)
        return (self.new[i - 1], self.new_ctx[i - 1]) if i else (0, 0)


# Calibration skips a PP observation (busy period) in which the predicted decode shares leave
# less than this part to prefill, and a TG observation (a stream's decode window) in which other
# prefills took more than that part: each would mostly echo the other model's estimate.
_MIN_PREFILL_SHARE = 0.2
_TG_MAX_PREFILL_SHARE = 0.5


@dataclass(slots=True)
class _BusyPeriod:
    """Prefill work a backend did while its prefill queue was never empty: one PP observation.

    From the moment a request reaches an empty queue until the queue empties again, the
    backend was prefilling all the time (apart from the decode part of mixed steps), so the
    tokens it computed against that span measure its PP. Per-request TTFTs would not: chunked
    prefill interleaves requests, so who paid for which step is unknowable from outside.
    A saturated backend never empties its queue, so periods are also cut every `MAX_GROUPS`
    first-token steps (the next one starts at the cut).

    A step that finishes prefills on a decoding backend also runs a decode step; the period's
    first-token steps each subtract the decode share predicted when their first request was
    routed (`decode_s`), so PP is the prefill speed itself. Counting that share as prefill made
    a hit-heavy, decode-heavy backend learn 2.5k-4.7k tokens/s for a true 30k (benchmarks/
    README.md), pricing every miss several times too dear.
    """

    MAX_GROUPS: ClassVar[int] = 16

    start: float = -1.0  # -1: no period open
    last_time: float = -1.0
    groups: int = 0
    tokens: int = 0
    token_ctx: int = 0
    decode_s: float = 0.0  # the decode share of the period's first-token steps (predicted)
    complete: bool = True  # every member's computed tokens are known and nothing failed

    def open(self, now: float) -> None:
        if self.start < 0:
            self.start, self.last_time = now, now

    def add(self, computed: int | None, context: int, now: float, mixed_s: float) -> None:
        if self.start < 0:
            return
        if now != self.last_time:  # a new step finished
            self.groups += 1
            self.last_time = now
            self.decode_s += mixed_s
        if computed is None:
            self.complete = False
        else:
            self.tokens += computed
            self.token_ctx += attention_pairs(computed, context)

    def close(self, now: float, perf: PerfModel) -> None:
        seconds = now - self.start
        prefill_s = seconds - self.decode_s
        # A period spent mostly on decode shares says little about PP (and what it says
        # leans on the TG estimate that predicted the shares): skip it.
        if self.complete and self.tokens > 0 and prefill_s > _MIN_PREFILL_SHARE * seconds:
            perf.observe_prefill_total(self.tokens, self.token_ctx, prefill_s, count=self.groups)
        self.start = self.last_time = -1.0
        self.groups = self.tokens = self.token_ctx = 0
        self.decode_s = 0.0
        self.complete = True


class _BackendModel:
    __slots__ = ("_speeds", "_speeds_at", "backlog", "busy", "perf", "prefills")

    def __init__(self, prior: PerfPrior) -> None:
        self.perf = PerfModel(prior)
        self.backlog = _Backlog(pending={})
        self.prefills = _PrefillLog()
        self.busy = _BusyPeriod()
        self._speeds_at = -1
        self._speeds = (0.0, 0.0, 0.0, 0.0)

    def speeds(self) -> tuple[float, float, float, float]:
        """(s per new token, s per attention pair, s per step, s per KV token in the step).

        The same numbers as `perf.prefill_time` / `perf.decode_step_time`, cached until the
        model learns something, so the per-backend loop of `choose` is plain arithmetic.
        """
        at = self.perf.updates
        if at != self._speeds_at:
            learned = self.perf.learned()
            self._speeds = (
                1.0 / learned.prefill_tokens_per_s,
                learned.prefill_s_per_token_ctx,
                learned.decode_step_s,
                learned.decode_s_per_kv_token,
            )
            self._speeds_at = at
        return self._speeds

    def routed(self, rid: str, prefill_s: float, now: float, due: float | None) -> None:
        if not self.backlog.pending:
            self.busy.open(now)
        self.backlog.add(rid, prefill_s, now, due)

    def first_token(
        self, rec: RequestRecord, now: float, learn: bool, decode_share_s: float
    ) -> None:
        """The prefill of `rec` is done (`prefill_done`, from its record)."""
        req = rec.request
        # OpenAI streams report cached tokens only in their last chunk; until then the index's
        # prediction stands in (feedback keeps the two close: equal in our live runs).
        cached = rec.predicted_cached_tokens if rec.cached_tokens is None else rec.cached_tokens
        computed = max(req.prompt_tokens - cached, 0)
        self.prefill_done(req.rid, computed, req.prompt_tokens, now, learn, decode_share_s)

    def prefill_done(
        self, rid: str, computed: int, context: int, now: float, learn: bool, decode_share_s: float
    ) -> None:
        """A prefill is done: update the backlog, the prefill log, the busy period.

        `decode_share_s`: the decode part of the step that finished it (0: PP absorbs it).
        Another replica's request comes here too (with its predicted computed tokens): its
        prefill filled the same busy period, and leaving it out made each of two workers learn
        half the backend's PP (the simulator's two views: p90 TTFT 0.27 -> 0.37 s).
        """
        self.backlog.done(rid, now)
        self.prefills.add(now, computed, context)
        if not learn:
            return
        busy = self.busy
        if busy.groups >= _BusyPeriod.MAX_GROUPS and now != busy.last_time:
            # Cut between two steps, so prefills that finished together stay together.
            cut = busy.last_time
            busy.close(cut, self.perf)
            busy.open(cut)
        busy.add(computed, context, now, decode_share_s)
        if not self.backlog.pending:
            busy.close(now, self.perf)

    def failed(self, rid: str, now: float) -> None:
        if rid in self.backlog.pending:
            self.busy.complete = False
        self.backlog.done(rid, now)
        if not self.backlog.pending and self.busy.start >= 0:
            self.busy.close(now, self.perf)


@register_policy
class CostPolicy(BasePolicy):
    """Route to the backend with the lowest predicted TTFT + N / TG (module docstring)."""

    name: ClassVar[str] = "cost"
    needs_blocks: ClassVar[bool] = True
    # True where _cached_tokens/_queue_s are overridden (the oracle): no inlined shortcut.
    _exact: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        self.config = CostConfig(**options)
        self.index = PrefixIndex(max_blocks=self.config.index_max_blocks)
        self.outputs = OutputLengthModel()
        self._models: dict[str, _BackendModel] = {}
        self._routed: dict[str, _Routed] = {}
        # other replicas' / workers' requests: rid -> [backend, prompt tokens, decoding?,
        # predicted computed tokens], and per backend how many of them decode and their KV
        # (the step time prices their batch too)
        self._remote: dict[str, list[Any]] = {}
        self._remote_decode: dict[str, list[int]] = {}
        # the KV each backend's in-flight requests hold, once the scheduler asks for it
        self._live_kv: LiveKV | None = None

    # -- backends -------------------------------------------------------------------------
    def on_backend_added(self, spec: BackendSpec) -> None:
        if spec.id not in self._models:
            self._models[spec.id] = _BackendModel(spec.prior or DEFAULT_PRIOR)
        self.index.add_backend(spec.id, spec.cache_capacity_tokens, self.config.block_tokens)

    def on_backend_removed(self, backend_id: str) -> None:
        self._models.pop(backend_id, None)
        self.index.remove_backend(backend_id)
        if self._live_kv is not None:
            self._live_kv.forget_backend(backend_id)

    def _model(self, state: BackendState) -> _BackendModel:
        model = self._models.get(state.id)
        if model is None:
            self.on_backend_added(state.spec)
            model = self._models[state.id]
        return model

    def learned(self) -> dict[str, dict[str, float]]:
        """Each backend's learned speeds, for /stats and /metrics."""
        out: dict[str, dict[str, float]] = {}
        for backend, model in self._models.items():
            prior = model.perf.learned()
            out[backend] = {
                "prefill_tokens_per_s": prior.prefill_tokens_per_s,
                "decode_step_s": prior.decode_step_s,
                "decode_s_per_kv_token": prior.decode_s_per_kv_token,
                "decode_tokens_per_s_single": 1.0 / prior.decode_step_s,
            }
        return out

    # -- the decision ---------------------------------------------------------------------
    def _cached_tokens(self, req: RouteRequest, backend: str, matches: dict[str, int]) -> int:
        held = matches.get(backend, 0)
        if not held:
            return 0
        cap = max(req.prompt_tokens - 1, 0)
        if backend in self.index.event_backends:
            # the router's blocks are the engine's pages: SGLang reuses whole pages of n-1
            cap -= cap % req.block_tokens
        return min(req.tokens_in_blocks(held), cap)

    def _queue_s(self, state: BackendState, model: _BackendModel, now: float) -> float:
        return model.backlog.remaining(now)

    def choose(
        self,
        req: RouteRequest,
        backends: Sequence[BackendState],
        now: float,
        *,
        ahead: Mapping[str, float] | None = None,
    ) -> Choice:
        """The cheapest backend; `ahead` adds seconds of work to some backends' queues.

        The scheduler (router.core.scheduler) passes the prefill it holds for each backend
        ahead of `req`, so requests waiting in the router count as queue where they will go.
        """
        matches = self.index.match(req.blocks)
        expected_output = self.outputs.expect(req.max_tokens)
        n = req.prompt_tokens
        interference = self.config.interference
        half_output = int(expected_output / 2)
        pending_w = self.config.pending_interference
        lateness = self.config.lateness
        # The hot loop: plain floats and locals per backend, no call (while its speeds are
        # cached) and no object; the winner's `_Routed` is built once, after the loop.
        best_cost = float("inf")
        best: BackendState | None = None
        best_cached = 0
        best_parts = (0.0, 0.0, 0.0, 0)  # queue_s, prefill_s, mixed_s, kv_tokens
        best_ttft = 0.0
        # The runner-up (next-lowest cost), for `serve --explain`: one comparison per backend.
        second_cost = float("inf")
        second: BackendState | None = None
        second_ttft = 0.0
        block_tokens = req.block_tokens
        cap = max(n - 1, 0)
        # backends whose entries come from KV events: the router's blocks are their pages, and
        # SGLang reuses whole pages of the prompt's first n-1 tokens
        evented = self.index.event_backends
        paged_cap = cap - cap % block_tokens
        models = self._models
        exact = self._exact
        for state in backends:
            backend = state.spec.id
            model = models.get(backend) or self._model(state)
            # model.speeds() without the call while nothing new was learned (nearly always)
            speeds = model._speeds if model._speeds_at == model.perf.updates else model.speeds()
            per_token, per_pair, step0, per_kv = speeds
            backlog = model.backlog
            if exact:
                cached = self._cached_tokens(req, backend, matches)
                queue_s = self._queue_s(state, model, now)
            else:  # the same as _cached_tokens and _queue_s, inlined: this loop is the hot path
                held = matches.get(backend)
                if held is None:
                    cached = 0
                else:
                    cached = min(held * block_tokens, paged_cap if backend in evented else cap)
                queue_s = backlog.work_s - (now - backlog.since)
                if queue_s < 0.0:
                    queue_s = 0.0
                if lateness and backlog.due:
                    queue_s += backlog.lateness(now)
            if ahead:
                queue_s += ahead.get(backend, 0.0)
            new = n - cached  # >= 1: a hit is capped at n - 1 tokens
            pairs = new * (n - new) + new * (new + 1) // 2  # attention_pairs(new, n)
            prefill_s = new * per_token + pairs * per_pair
            kv = state.decoding_kv_tokens  # `_decode_batch`, inlined
            decoding = state.decoding
            if self._remote_decode:
                extra = self._remote_decode.get(backend)
                if extra is not None:
                    decoding += extra[0]
                    kv += extra[1]
            step_s = step0 + per_kv * (kv + n + half_output)
            mixed_s = step0 + per_kv * kv if decoding else 0.0
            cost = (
                queue_s
                + prefill_s
                + mixed_s
                + expected_output * step_s
                + decoding * interference * prefill_s
            )
            if backlog.pending:  # it delays each pending first token by its prefill, at most
                cost += pending_w * len(backlog.pending) * min(prefill_s, queue_s)
            if cost < best_cost or best is None:
                if best is not None:  # the old best is now the runner-up
                    second_cost, second, second_ttft = best_cost, best, best_ttft
                best_cost = cost
                best = state
                best_cached = cached
                best_ttft = queue_s + prefill_s + mixed_s
                best_parts = (queue_s, prefill_s, mixed_s, kv + n + half_output)
            elif cost < second_cost:
                second_cost, second, second_ttft = cost, state, queue_s + prefill_s + mixed_s
        assert best is not None  # choose() is never called with no backends
        queue_s, prefill_s, mixed_s, kv_tokens = best_parts
        routed = self._routed[req.rid] = _Routed(
            queue_s=queue_s, prefill_s=prefill_s, mixed_s=mixed_s, kv_tokens=kv_tokens
        )
        return Choice(
            backend=best.spec.id,
            predicted_cached_tokens=best_cached,
            predicted_ttft_s=routed.ttft_s,
            reason=f"cost {best_cost:.3f}s",
            cost_s=best_cost,
            explain=Explanation(
                queue_s=queue_s,
                prefill_s=prefill_s,
                decode_s=mixed_s,
                cached_tokens=best_cached,
                runner_up=None if second is None else second.spec.id,
                runner_up_ttft_s=None if second is None else second_ttft,
            ),
        )

    # -- what the scheduler asks (router.core.scheduler) ------------------------------------
    def queue_s(self, state: BackendState, now: float) -> float:
        """Seconds of prefill ahead of a request sent to `state` now (as `choose` counts it)."""
        model = self._model(state)
        queue = self._queue_s(state, model, now)
        if not self._exact and self.config.lateness and model.backlog.due:
            queue += model.backlog.lateness(now)
        return queue

    def track_live_kv(self) -> None:
        """Keep the KV each backend's in-flight requests hold (`budget_queue_s` reads it);
        from now on: requests already in flight are not in it."""
        if self._live_kv is None:
            self._live_kv = LiveKV()

    def budget_queue_s(
        self, state: BackendState, now: float, step_tokens: int, kv_room_share: float
    ) -> float:
        """`queue_s` for the scheduler's budget: the decode share counted once per engine step
        while the backend has KV room, once per request (as `queue_s`) when it does not.

        Each request routed to a backend adds to its backlog the decode step its prefill
        shares; requests whose prefills share one step (SGLang fills a step with up to
        `step_tokens` of its queue) share that decode step too, so on a busy pool the sum reads
        the queue longer than it is (16 backends in a burst: 0.54 s against the engines' own
        0.23 s), and the budget kept 2-4 prefills in the engines' steps. Counted per step,
        the queue is the engines' own; but where the in-flight requests already hold more than
        `kv_room_share` of the backend's KV, what the engine queues waits for memory, and the
        per-request count, which keeps that queue short, is the better budget (multi-turn on 8
        backends at its capacity: benchmarks/README.md).
        """
        queue = self.queue_s(state, now)
        if self._exact:  # the oracle's queue is the engine's own
            return queue
        over = 0.0
        tokens = 0
        for rid, rec in state.in_flight.items():
            if rec.first_token_at is not None:
                continue
            routed = self._routed.get(rid)
            if routed is not None:
                over += routed.mixed_s
            tokens += rec.request.prompt_tokens - rec.predicted_cached_tokens
        if not over:
            return queue
        capacity = state.spec.kv_capacity_tokens
        if capacity:
            held = (
                self._live_kv.tokens(state.id, state.decoding_kv_tokens)
                if self._live_kv is not None
                else state.decoding_kv_tokens + state.pending_prefill_tokens
            )
            if held > kv_room_share * capacity:
                return queue
        _, _, step0, per_kv = self._model(state).speeds()
        decoding, kv = self._decode_batch(state)
        mixed = step0 + per_kv * kv if decoding else 0.0  # as `choose` prices it
        steps = -(-tokens // step_tokens)
        return max(0.0, queue - over + steps * mixed)

    def _decode_batch(self, state: BackendState) -> tuple[int, int]:
        """(requests decoding on `state`, their KV tokens), other replicas' included."""
        decoding, kv = state.decoding, state.decoding_kv_tokens
        extra = self._remote_decode.get(state.id)
        if extra is not None:
            decoding += extra[0]
            kv += extra[1]
        return decoding, kv

    def prefill_estimate(self, req: RouteRequest, backends: Sequence[BackendState]) -> float:
        """`req`'s shortest predicted prefill over `backends` (each with its own cached prefix)."""
        matches = self.index.match(req.blocks)
        best = float("inf")
        for state in backends:
            cached = self._cached_tokens(req, state.id, matches)
            perf = self._model(state).perf
            best = min(best, perf.prefill_time(req.prompt_tokens - cached, req.prompt_tokens))
        return 0.0 if best == float("inf") else best

    def prefill_time(self, state: BackendState, new_tokens: int, context_tokens: int) -> float:
        """Seconds `state` needs to prefill `new_tokens` at the end of `context_tokens`."""
        return self._model(state).perf.prefill_time(new_tokens, context_tokens)

    def service_rate(
        self, state: BackendState, prompt_tokens: float, new_tokens: float, prefill_s: float
    ) -> float:
        """Requests per second `state` completes with its batch full, for requests of
        `prompt_tokens` of which `new_tokens` are not cached, each taking `prefill_s` of its
        time to prefill (the scheduler's throughput admission).

        The batch is B = max_running_requests, fewer if B requests' own KV (their uncached
        prompt and output; a cached prefix is shared) would not fit its memory. Each request
        stays for N steps (N: the expected output) of the step time TG at that batch, in which
        every request reads its whole context (prompt + N/2 on average), and every prefill
        takes its share of the engine's time: B / (N * TG(B * ctx) + B * prefill_s).
        """
        _, _, step0, per_kv = self._model(state).speeds()
        expected = max(self.outputs.expect(None), 1.0)
        spec = state.spec
        batch = float(spec.max_running_requests or 0)
        if spec.kv_capacity_tokens is not None:
            fits = spec.kv_capacity_tokens / max(new_tokens + expected, 1.0)
            batch = min(batch, fits) if batch else fits
        if batch <= 0:
            return math.inf
        step_s = step0 + per_kv * batch * (prompt_tokens + expected / 2)
        return batch / (expected * step_s + batch * prefill_s)

    def forget(self, rid: str) -> None:
        """Drop what `choose` kept for a request that will not be routed (shed by the router)."""
        self._routed.pop(rid, None)

    # -- what happened --------------------------------------------------------------------
    def _decode_share_s(self, routed: _Routed) -> float:
        """The decode step `routed`'s prefill step carries, as the queue and PP count it."""
        return routed.mixed_s if self.config.net_decode else 0.0

    def on_routed(self, rec: RequestRecord, now: float) -> None:
        if self._live_kv is not None:  # every routed request; on_finished / on_failed remove
            self._live_kv.add(rec.backend, rec.request.blocks, rec.request.block_tokens)
        routed = self._routed.get(rec.request.rid)
        model = self._models.get(rec.backend)
        if routed is None or model is None:
            return
        due = now + routed.ttft_s if rec.request.first_token_seen else None
        model.routed(rec.request.rid, routed.prefill_s + self._decode_share_s(routed), now, due)
        req = rec.request
        self.index.insert(
            rec.backend, req.blocks, now, req.block_tokens, prompt_tokens=req.prompt_tokens
        )
        self.index.expect(rec.backend, req.blocks)  # an event-driven backend: until it ends

    def on_first_token(self, rec: RequestRecord, now: float) -> None:
        if self._live_kv is not None:
            self._live_kv.first_token(rec.request.rid, rec.backend, rec.request.prompt_tokens)
        model = self._models.get(rec.backend)
        routed = self._routed.get(rec.request.rid)
        if model is None or routed is None:
            return
        model.first_token(rec, now, self.config.calibrate, self._decode_share_s(routed))
        if rec.cached_tokens is not None:  # /generate streams report it with the first token
            self._learn_from_cached(rec, routed, model, now, late=False)

    def on_finished(self, rec: RequestRecord, now: float, output_tokens: int) -> None:
        if self._live_kv is not None:
            self._live_kv.remove(rec.request.rid, rec.backend, rec.request.blocks)
        routed = self._routed.pop(rec.request.rid, None)
        if routed is not None:
            self.index.settle(rec.backend, rec.request.blocks)
        model = self._models.get(rec.backend)
        self.outputs.observe(output_tokens)
        if model is None or routed is None:
            return
        model.backlog.done(rec.request.rid, now)
        if rec.cached_tokens is not None and not routed.fed_back:
            # OpenAI streams and non-streaming responses report cached tokens only at the end.
            self._learn_from_cached(rec, routed, model, now, late=True)
        if self.config.calibrate and rec.first_token_at is not None and output_tokens > 1:
            decoding_s = now - rec.first_token_at
            others = model.prefills.seconds_between(rec.first_token_at, now, model.perf.learned())
            if others < _TG_MAX_PREFILL_SHARE * decoding_s:
                step = (decoding_s - others) / (output_tokens - 1)
                model.perf.observe_decode(routed.kv_tokens, step)

    def _learn_from_cached(
        self, rec: RequestRecord, routed: _Routed, model: _BackendModel, now: float, *, late: bool
    ) -> None:
        """The backend said how much of the prompt it had: correct the index.

        When it said so only at the end (`late`), the busy period could not count this
        request's tokens, so PP learns from its TTFT instead, if it met an empty queue.
        """
        assert rec.cached_tokens is not None
        routed.fed_back = True
        req = rec.request
        if self.config.feedback:
            self.index.observe_cached(
                rec.backend,
                req.blocks,
                rec.cached_tokens,
                now,
                req.block_tokens,
                prompt_tokens=req.prompt_tokens,
                predicted_tokens=rec.predicted_cached_tokens,
            )
        computed = req.prompt_tokens - rec.cached_tokens
        if (
            self.config.calibrate
            and late
            and rec.first_token_at is not None
            and routed.queue_s == 0.0
            and computed > 0
        ):
            # Routed to an empty prefill queue: TTFT is the prefill, plus the decode step that
            # shared its step if the backend was decoding.
            ttft = rec.first_token_at - rec.routed_at
            model.perf.observe_prefill(
                computed, req.prompt_tokens, max(ttft - routed.mixed_s, 1e-6)
            )

    def on_failed(self, rec: RequestRecord, now: float) -> None:
        if self._live_kv is not None:
            self._live_kv.remove(rec.request.rid, rec.backend, rec.request.blocks)
        if self._routed.pop(rec.request.rid, None) is not None:
            self.index.settle(rec.backend, rec.request.blocks)
        model = self._models.get(rec.backend)
        if model is not None:
            model.failed(rec.request.rid, now)

    # -- other replicas (router.state) ------------------------------------------------------
    def on_remote_routed(self, backend: str, req: RouteRequest, now: float) -> None:
        """Another replica sent `req` to `backend`: it will hold the prefix and is busier."""
        model = self._models.get(backend)
        if model is None:
            return
        held = self.index.match(req.blocks).get(backend, 0)
        cached = min(req.tokens_in_blocks(held), max(req.prompt_tokens - 1, 0))
        prefill_s = model.perf.prefill_time(req.prompt_tokens - cached, req.prompt_tokens)
        # no due: a Routed event does not say whether a first token will follow (non-streaming
        # requests send none), so a remote request can never count as late
        model.routed(req.rid, prefill_s, now, None)
        self.index.insert(
            backend, req.blocks, now, req.block_tokens, prompt_tokens=req.prompt_tokens
        )
        self._remote[req.rid] = [backend, req.prompt_tokens, False, req.prompt_tokens - cached]

    def on_remote_first_token(self, backend: str, rid: str, now: float) -> None:
        """Its prefill is done: off the queue, into the backend's decoding batch."""
        model = self._models.get(backend)
        remote = self._remote.get(rid)
        if remote is None or remote[2]:
            if model is not None:
                model.backlog.done(rid, now)
            return
        remote[2] = True
        if model is not None:
            model.prefill_done(rid, remote[3], remote[1], now, self.config.calibrate, 0.0)
        tally = self._remote_decode.setdefault(remote[0], [0, 0])
        tally[0] += 1
        tally[1] += remote[1] + 1  # as the core counts its own: prompt + the first token

    def on_remote_ended(self, backend: str, rid: str, now: float) -> None:
        model = self._models.get(backend)
        if model is not None:
            model.backlog.done(rid, now)
        remote = self._remote.pop(rid, None)
        if remote is not None and remote[2]:
            tally = self._remote_decode[remote[0]]
            tally[0] -= 1
            tally[1] -= remote[1] + 1
            if tally[0] <= 0:
                del self._remote_decode[remote[0]]


class OracleProbe(Protocol):
    """What the simulator lets the oracle see (router.replay.simulate.EngineProbe)."""

    def cached_tokens(self, backend: str, req: RouteRequest) -> int: ...

    def wait_s(self, backend: str, now: float) -> float: ...


@register_policy
class OraclePolicy(CostPolicy):
    """The cost formula fed the truth: real cache contents and real queue waits (simulator only)."""

    name: ClassVar[str] = "oracle"
    needs_blocks: ClassVar[bool] = True
    _exact: ClassVar[bool] = True

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        options.setdefault("calibrate", False)
        options.setdefault("feedback", False)
        super().__init__(rng, **options)
        self._probe: OracleProbe | None = None

    def bind_probe(self, probe: OracleProbe) -> None:
        self._probe = probe

    def _cached_tokens(self, req: RouteRequest, backend: str, matches: dict[str, int]) -> int:
        if self._probe is None:
            raise RuntimeError("the oracle policy runs only in the simulator (no probe bound)")
        return self._probe.cached_tokens(backend, req)

    def _queue_s(self, state: BackendState, model: _BackendModel, now: float) -> float:
        assert self._probe is not None
        # The engine's own wait, plus prefill already routed to it in this same instant.
        return self._probe.wait_s(state.id, now)
