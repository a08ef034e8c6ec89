"""`cost` (the default) and `oracle`: route each request where its predicted latency is lowest.

For backend b and a request with n prompt tokens and an expected N output tokens::

    cached_b  = tokens of the longest prefix b is believed to hold (PrefixIndex), < n
    queue_b   = prefill work routed to b that has not produced its first token yet, in seconds
                of b's PP speed, minus the time b has been working through it since
    ttft_b    = queue_b + prefill_b(n - cached_b, context n) + (step_b if b is decoding)
    step_b    = b's decode step time with this request joined to its batch (TG)
    cost_b    = ttft_b + N * step_b + interference * decoding_b * prefill_b(...)

(A prefill runs in a step that also advances b's running decodes, so when b is decoding the
first token comes one decode step after the prefill work; an idle b answers in the prefill.)

The last term is what the request does to the streams already decoding on b: while b prefills
it, each of those streams waits (SGLang runs the prefill chunk in the same or a separate step).

Every speed is b's own `PerfModel`, starting from the backend's prior and calibrated online
from what b did: TTFTs of requests routed to an idle queue give PP (with the reported
`cached_tokens`, so we know how many tokens it really computed), and each finished request's
mean inter-token gap gives TG against the batch's KV size. What b reports as cached corrects the
index (feedback), so a prefix that b evicted stops attracting requests.

`oracle` uses the same formula with the truth: the engines' real cache (device and host
tier), their real queue wait, and their true profiles. It exists only in the simulator and
bounds what any router could reach with this cost function.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from router.core.cost import OutputLengthModel, PerfModel
from router.core.index import PrefixIndex
from router.core.model import (
    BackendSpec,
    BackendState,
    BasePolicy,
    Choice,
    PerfPrior,
    RequestRecord,
    RouteRequest,
)
from router.core.policies import register_policy

__all__ = ["CostConfig", "CostPolicy", "OraclePolicy", "OracleProbe"]

# A backend we know nothing about: an 8B model on one H100 (profile llama3-8b-h100).
DEFAULT_PRIOR = PerfPrior(
    prefill_tokens_per_s=30_000.0,
    prefill_s_per_token_ctx=1.0e-9,
    decode_step_s=0.0065,
    decode_s_per_kv_token=4.0e-8,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CostConfig:
    """Knobs of the cost policy. Defaults are set by mechanism, not fitted to one trace."""

    index_max_blocks: int = 1_000_000
    # Tokens per block for KV events that carry no size (requests carry their own).
    block_tokens: int = 64
    # Weight of the slowdown a prefill imposes on b's running streams (0 ignores it).
    interference: float = 0.25
    # Use reported cached_tokens to correct the index, and observed timings to calibrate.
    feedback: bool = True
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.index_max_blocks <= 0:
            raise ValueError("index_max_blocks must be positive")
        if self.interference < 0:
            raise ValueError("interference must be non-negative")


@dataclass(slots=True)
class _Backlog:
    """Prefill work routed to one backend that has not produced a first token yet.

    `work_s` was outstanding at time `since`; the backend burns it at one second per second.
    """

    pending: dict[str, float]
    work_s: float = 0.0
    since: float = 0.0

    def remaining(self, now: float) -> float:
        return max(0.0, self.work_s - max(0.0, now - self.since))

    def add(self, rid: str, prefill_s: float, now: float) -> None:
        self.work_s = self.remaining(now) + prefill_s
        self.since = now
        self.pending[rid] = prefill_s

    def done(self, rid: str, now: float) -> None:
        if self.pending.pop(rid, None) is None:
            return
        # What is left is at most what is still queued (the finished one is out of it).
        self.work_s = min(self.remaining(now), sum(self.pending.values()))
        self.since = now


@dataclass(slots=True)
class _Estimate:
    backend: str
    cost: float
    ttft: float
    cached: int


@dataclass(slots=True, kw_only=True)
class _Routed:
    queue_s: float
    prefill_s: float
    mixed_s: float  # the decode step sharing the prefill's step (0 if the backend was idle)
    kv_tokens: int
    fed_back: bool = False  # the backend's cached_tokens has been learned from
    pp_learned: bool = False  # observed through the busy-period service groups


class _PrefillLog:
    """When each prefill finished on a backend and how long we think it took.

    A stream's mean inter-token gap includes the prefills that ran in its decode window (mixed
    steps); subtracting them leaves the decode step time that TG calibration wants.
    """

    __slots__ = ("cumulative", "times")

    def __init__(self, keep: int = 4096) -> None:
        self.times: deque[float] = deque(maxlen=keep)
        self.cumulative: deque[float] = deque(maxlen=keep)

    def add(self, now: float, prefill_s: float) -> None:
        total = self.cumulative[-1] if self.cumulative else 0.0
        self.times.append(now)
        self.cumulative.append(total + prefill_s)

    def between(self, start: float, end: float) -> float:
        """Prefill seconds that finished in (start, end]."""
        if not self.times or start < self.times[0]:
            return 0.0 if not self.times else self._upto(end)
        return self._upto(end) - self._upto(start)

    def _upto(self, t: float) -> float:
        i = bisect_right(self.times, t)
        return self.cumulative[i - 1] if i else 0.0


@dataclass(slots=True)
class _ServiceGroup:
    """Prefills whose first tokens came out in one step: one busy-period observation.

    On a busy backend the time between two first tokens is the later prefill's service time;
    on an idle one it is the time since the request arrived. Prefills batched into one step
    finish together, so they are observed together: their tokens against the step's time.
    """

    time: float = -1.0
    start: float = 0.0
    mixed_s: float = 0.0
    tokens: int = 0
    token_ctx: int = 0
    complete: bool = True  # every member's computed tokens are known


class _BackendModel:
    __slots__ = ("backlog", "group", "perf", "prefills")

    def __init__(self, prior: PerfPrior) -> None:
        self.perf = PerfModel(prior)
        self.backlog = _Backlog(pending={})
        self.prefills = _PrefillLog()
        self.group = _ServiceGroup()

    def observe_first_token(self, rec: RequestRecord, mixed_s: float, now: float) -> bool:
        """Fold a first token into the service groups; True if PP learned from it."""
        group = self.group
        req = rec.request
        computed = None if rec.cached_tokens is None else req.prompt_tokens - rec.cached_tokens
        if now == group.time:
            group.start = min(group.start, max(rec.routed_at, group.start))
        else:
            self._flush()
            start = rec.routed_at if group.time < 0 else max(rec.routed_at, group.time)
            self.group = group = _ServiceGroup(time=now, start=start, mixed_s=mixed_s)
        if computed is None:
            group.complete = False
            return False
        group.tokens += computed
        group.token_ctx += computed * req.prompt_tokens
        return True

    def _flush(self) -> None:
        group = self.group
        if group.time < 0 or not group.complete or group.tokens <= 0:
            return
        seconds = group.time - group.start - group.mixed_s
        if seconds > 0:
            self.perf.observe_prefill(group.tokens, group.token_ctx // group.tokens, seconds)


@register_policy
class CostPolicy(BasePolicy):
    """Route to the backend with the lowest predicted TTFT + N / TG (module docstring)."""

    name: ClassVar[str] = "cost"
    needs_blocks: ClassVar[bool] = True

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        self.config = CostConfig(**options)
        self.index = PrefixIndex(max_blocks=self.config.index_max_blocks)
        self.outputs = OutputLengthModel()
        self._models: dict[str, _BackendModel] = {}
        self._routed: dict[str, _Routed] = {}

    # -- backends -------------------------------------------------------------------------
    def on_backend_added(self, spec: BackendSpec) -> None:
        if spec.id not in self._models:
            self._models[spec.id] = _BackendModel(spec.prior or DEFAULT_PRIOR)
        self.index.add_backend(spec.id, spec.cache_capacity_tokens, self.config.block_tokens)

    def on_backend_removed(self, backend_id: str) -> None:
        self._models.pop(backend_id, None)
        self.index.remove_backend(backend_id)

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
        return min(req.tokens_in_blocks(matches.get(backend, 0)), max(req.prompt_tokens - 1, 0))

    def _queue_s(self, state: BackendState, model: _BackendModel, now: float) -> float:
        return model.backlog.remaining(now)

    def _estimate(
        self,
        req: RouteRequest,
        state: BackendState,
        model: _BackendModel,
        cached: int,
        queue_s: float,
        expected_output: float,
    ) -> tuple[_Estimate, _Routed]:
        n = req.prompt_tokens
        prefill_s = model.perf.prefill_time(n - cached, n)
        kv_tokens = state.decoding_kv_tokens + n + int(expected_output / 2)
        step_s = model.perf.decode_step_time(kv_tokens)
        mixed_s = model.perf.decode_step_time(state.decoding_kv_tokens) if state.decoding else 0.0
        ttft = queue_s + prefill_s + mixed_s
        cost = (
            ttft + expected_output * step_s + self.config.interference * state.decoding * prefill_s
        )
        return (
            _Estimate(backend=state.id, cost=cost, ttft=ttft, cached=cached),
            _Routed(queue_s=queue_s, prefill_s=prefill_s, mixed_s=mixed_s, kv_tokens=kv_tokens),
        )

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        matches = self.index.match(req.blocks)
        expected_output = self.outputs.expect(req.max_tokens)
        best: tuple[_Estimate, _Routed] | None = None
        for state in backends:
            model = self._model(state)
            cached = self._cached_tokens(req, state.id, matches)
            candidate = self._estimate(
                req, state, model, cached, self._queue_s(state, model, now), expected_output
            )
            if best is None or candidate[0].cost < best[0].cost:
                best = candidate
        assert best is not None  # choose() is never called with no backends
        estimate, routed = best
        self._routed[req.rid] = routed
        return Choice(
            backend=estimate.backend,
            predicted_cached_tokens=estimate.cached,
            predicted_ttft_s=estimate.ttft,
            reason=f"cost {estimate.cost:.3f}s",
        )

    # -- what happened --------------------------------------------------------------------
    def on_routed(self, rec: RequestRecord, now: float) -> None:
        routed = self._routed.get(rec.request.rid)
        model = self._models.get(rec.backend)
        if routed is None or model is None:
            return
        model.backlog.add(rec.request.rid, routed.prefill_s, now)
        req = rec.request
        self.index.insert(
            rec.backend, req.blocks, now, req.block_tokens, prompt_tokens=req.prompt_tokens
        )

    def on_first_token(self, rec: RequestRecord, now: float) -> None:
        model = self._models.get(rec.backend)
        routed = self._routed.get(rec.request.rid)
        if model is None or routed is None:
            return
        model.backlog.done(rec.request.rid, now)
        model.prefills.add(now, routed.prefill_s)
        if self.config.calibrate and model.observe_first_token(rec, routed.mixed_s, now):
            routed.pp_learned = True
        if rec.cached_tokens is not None:  # /generate streams report it with the first token
            self._learn_from_cached(rec, routed, model, now)

    def on_finished(self, rec: RequestRecord, now: float, output_tokens: int) -> None:
        routed = self._routed.pop(rec.request.rid, None)
        model = self._models.get(rec.backend)
        self.outputs.observe(output_tokens)
        if model is None or routed is None:
            return
        model.backlog.done(rec.request.rid, now)
        if rec.cached_tokens is not None and not routed.fed_back:
            # OpenAI streams and non-streaming responses report cached tokens only at the end.
            self._learn_from_cached(rec, routed, model, now)
        if self.config.calibrate and rec.first_token_at is not None and output_tokens > 1:
            decoding_s = now - rec.first_token_at
            others = model.prefills.between(rec.first_token_at, now)
            if others < 0.5 * decoding_s:  # a window mostly spent prefilling tells little
                step = (decoding_s - others) / (output_tokens - 1)
                model.perf.observe_decode(routed.kv_tokens, step)

    def _learn_from_cached(
        self, rec: RequestRecord, routed: _Routed, model: _BackendModel, now: float
    ) -> None:
        """The backend said how much of the prompt it had: correct the index, learn PP."""
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
            and rec.first_token_at is not None
            and not routed.pp_learned
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
        self._routed.pop(rec.request.rid, None)
        model = self._models.get(rec.backend)
        if model is not None:
            model.backlog.done(rec.request.rid, now)


class OracleProbe(Protocol):
    """What the simulator lets the oracle see (router.replay.simulate.EngineProbe)."""

    def cached_tokens(self, backend: str, req: RouteRequest) -> int: ...

    def wait_s(self, backend: str, now: float) -> float: ...


@register_policy
class OraclePolicy(CostPolicy):
    """The cost formula fed the truth: real cache contents and real queue waits (simulator only)."""

    name: ClassVar[str] = "oracle"
    needs_blocks: ClassVar[bool] = True

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
