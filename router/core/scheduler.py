"""The router-side scheduler: which waiting request binds to which backend, and when.

Without it every request is bound the moment it arrives. With it, requests wait in the router
and a step function (vLLM v1's shape: `schedule() -> output`) releases them::

    submit(ticket, now)  -> None (queued) or a Shed (answer 429 now: queue full, or the best
                            predicted TTFT misses the request's deadline by the margin)
    step(now)            -> ScheduleOutput(bound, shed, wake_at)

The proxy and the simulator each drive it from their own clock: submit on arrival, then
`step` after every arrival, every first token and finish they feed the RoutingCore, and at
`wake_at`. Neither holds scheduling logic; binding is `RoutingCore.route` with the choice the
scheduler asked the policy for.

**Late binding.** A backend takes more work only while its predicted prefill queue (the cost
policy's backlog in seconds, from the learned PP: `queue_s`) plus the work the scheduler holds
for it stays under `budget_s`, and while it has a running slot free (fewer requests in flight
than its `max_running_requests`: past that SGLang queues them where no order of ours applies;
at 3x capacity multi-turn engines sat at their 256 slots with a prefill queue the budget
allowed). The rest waits here, where the order can still change. The queue the budget
reads counts the decode step each prefill shares once per engine step (`step_tokens`), not
once per request as the policy's backlog does, while the backend's in-flight requests hold
under `kv_room_share` of its KV (`CostPolicy.budget_queue_s`, `LiveKV`): the per-request
count read a busy engine's queue twice as long as it was and kept 2-4 prefills in its steps
where the engine alone ran ~10 (multi-turn bursts on 16 backends: 0.93-0.97x cost's capacity
-> 1.00-1.03x), but where KV is short what the engine queues waits for memory, and the
shorter queue the per-request count keeps is better (multi-turn on 8 backends).

**Order.** Higher `priority` first; within a priority, the tenant with the least service so
far (virtual-time fair queueing: each bound request charges its tenant its predicted prefill
seconds, and a tenant that comes back from idle starts at the least active tenant's count, so
it cannot bank credit; with isolation or engine priority on, service counts over the last
`_SHARE_S` only, as the shares those judge by: counted since the start, a light tenant whose
requests were bound freely while a flood was shed or held had more service than the flood
and went after its whole backlog, past the scan limit, 2 s in the router on fairness seed 3);
within a tenant, shortest predicted prefill first with aging: the key
is ``prefill_s + aging * arrival``, i.e. ``prefill_s - aging * waited`` plus a constant, so
the order of two waiting requests never changes and a sorted list keeps it. With a TTFT target
(`late_last_s`, else `slo_ttft_s`), requests that can no longer meet it (waited + predicted
prefill past it) go after all that still can: the order that maximises requests within the
SLO, at the price of a longer tail for the ones already late (bounded by `queue_timeout_s`).

**Locality.** Each request in that order is priced by the policy over every routable backend,
with the work held ahead of it added to each backend's queue (`ahead`). If its best backend
has room it binds there; if not it waits for that backend (its cached prefix is worth more
than the queue, by the policy's own arithmetic) and its prefill counts as held work there, so
the requests behind it see that backend as busier and go elsewhere; past the backend's free
running slots each one held there also adds the time between two of its requests finishing
with its batch full (`_slot_gap_s`), a wait its prefill seconds do not show. It does not
wait when a backend with room predicts a first token no later with no less of its prompt cached
(`_no_wait`): the policy's pick can be a full backend for its other terms (the decode steps
the request will share, its interference with the running streams), and a wait for it costs a
TTFT the policy never priced, as shorter arrivals go first. With that rule capacity went from
1.04-1.06x to 1.05-1.07x on multi-turn and from 1.01-1.04x to 1.05-1.11x on shared-prefix
(seeds 1-4; benchmarks/README.md).

**Prefix coalescing.** A request sharing at least `coalesce_tokens` of uncached prefix with a
request still prefilling it (a leader: bound with that much prompt not cached anywhere) waits
until the leader's first token, then binds like any other (the policy's index already places
the prefix at the leader's backend), so the prefix is computed once instead of in parallel.
It waits only while the leader's predicted first token is nearer than the time it would take
to compute the shared prefix itself: holding every follower for its leader's whole TTFT cost
shared-prefix p90 1.78 s against 0.77 s without coalescing (load 8.5), with this rule 0.67 s.

**Admission.** With a deadline (deployment `slo_ttft_s`, or the ticket's own), a request whose
predicted TTFT exceeds ``deadline * shed_factor`` is shed on arrival with a Retry-After. The
prediction is the largest of: the pool queue plus the held work released before it, shared
over the backends (never less than the best single backend's queue), plus its own prefill;
the policy's price at the backend it would pick, with held work counted where it waits; and
(`rate_admission`) the requests held ahead of it over the rate the router has bound requests
lately, plus the best queue and its own prefill. The last is what keeps an admitted request
on time at overload: prefill seconds do not see waits for running slots or for a cached
backend, nor the shorter requests that arrive later and go first (without it, admitted p90 at
2x capacity was 12.8 s on multi-turn and 11.2 s on shared-prefix, SLO 2 s). "Ahead" follows
the release order: all of higher priority; within its priority its own tenant's, and of each
other tenant as many as its own plus one (fair queueing interleaves them). The queue holds at
most `max_queue` requests; one waiting longer than `queue_timeout_s` is shed ("timeout").

**Throughput admission** (`throughput_admission`). A pool whose batches are full completes at
most mu requests a second: each backend's B running slots (fewer where B requests' own KV
would not fit), each request N steps (the expected output) of the decode step at that batch,
plus every prefill's share of the engine (the cost policy's `service_rate`, at the mean size
of the last 256 bound requests). Admitting faster than that only fills the slots; at 2x
capacity on shared-prefix (all answers 256 tokens) they filled in 14 s, then decoded in
lock-step for ~14 s more with nothing finishing, no slot free and everything shed (goodput
53.8 against 69.4 at capacity). So each admitted request advances a clock by
1 / (`throughput_headroom` * mu), and a newcomer's predicted TTFT is at least that clock's
lead over now plus its prefill: at sustained overload the pool admits ~headroom * mu and the
starts stay spread over a request's lifetime. The headroom (1.5) lets the batches absorb
bursts and a finite overload: at 1.0 shared-prefix at its capacity, which arrives 5% faster
than its full batches sustain in the long run, sheds 19% (benchmarks/README.md has the
sweep). A tenant under its share is not priced by the clock (it goes ahead of the others'
excess), but its admissions advance it. While isolation is on there is no headroom: the
pool takes its full-batch rate and no more, so a flood's batches leave the light tenant's
requests room (beside a 3x flood its p90 went from 1.50-1.53x solo to 1.30-1.37x, and the
flood's own admitted p90 from 5.0-6.0 s to 1.2-1.6 s, for 1-4% of the flood's goodput).

**Engine priority** (`engine_priority`, for engines run with SGLang's
`--enable-priority-scheduling`, whose waiting queue is then ordered by `priority`, higher
first, then arrival). A tenant under its share (less than an equal share of the predicted
prefill bound over the last `_SHARE_S`, among the tenants that had any) is sent with priority
``2 * priority + 1``, everyone else with ``2 * priority``, so inside the engine it goes ahead of
a flood's queued prefill; it therefore binds past the budget (only other boosted work counts
there), to a backend with a running slot free, and its admission is priced that way. A gap of
1 stays under SGLang's default preemption threshold (10), so nothing running is retracted for
it (client priorities more than 5 apart do cross it there: the simulated engine does not model
that preemption). `reserve` keeps that share of each backend's budget and running slots for
such requests.

**Isolation** (`isolation`, on by default). While a tenant over its share (the decayed shares
above, kept whether or not engine priority is on) has requests waiting here and another tenant
is under its share, the over-share tenants' requests bind only to a backend whose predicted
prefill queue is under `isolation_queue_s` (10 ms: next to nothing queued), and the
under-share tenants' requests no longer see the over-share ones' held work (in the budget
check, the running slots and admission) and go to the backend with the lowest predicted TTFT
rather than the lowest cost (`_fastest`). The router keeps the flood's backlog, the engines
keep short queues, and an under-share request waits at most for the step under way. What
was measured (benchmarks/scheduler.py part c): the small tenant's wait is in the engines,
not the router: the step under way, its own step shared with the flood's prefill chunks
(2-6k tokens), and the flood's decode batch (100-200 requests) in every step. Tried and
dropped (seed 2): setting backends aside for it, sized from its demand (p90 0.30 s), and
keeping KV room for it on every backend (0.16-0.22 s), both at 50-58 req/s of flood goodput
against 74 without isolation; this gave 0.18 s at 72, and with the fair order over the share
window, TTFT placement and no throughput headroom 0.112 s at 68.8 (solo 0.082 s). One tenant
alone never triggers it (a tenant alone is never under its share).

Any policy can be driven: the cost policy (and the oracle) supply `queue_s`, `prefill_estimate`
and `choose(..., ahead=)`; for others the queue is the pending prefill tokens at `DEFAULT_PP`.
No I/O, no clock: `now` is an argument.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from router.core.model import BackendState, Choice, RouteRequest
from router.core.routing import Decision, NoBackendError, RoutingCore

__all__ = [
    "DEFAULT_PP",
    "Bound",
    "ScheduleOutput",
    "Scheduler",
    "SchedulerConfig",
    "Shed",
    "Ticket",
    "headroom_knobs",
    "parse_headroom",
]

# Prefill tokens per second assumed for policies that do not predict queues (llama3-8b-h100).
DEFAULT_PP = 30_000.0
# The soonest `wake_at` lies after `now`: a predicted queue that is about to free room.
_MIN_TICK_S = 0.005
# A request waiting for a backend that is still full is priced again after this long (or
# once that backend has room): pricing every waiting request at every step is what made
# overloaded runs quadratic (conv-h100 at 2x capacity: 32 prices per step).
_REPRICE_S = 0.25
# Engine priority: the window (decay time) over which tenants' shares of bound prefill count.
_SHARE_S = 30.0
# Isolation stays on this long after the last sign of a flood (a backlog that empties for a
# moment does not hand the engines' queues back to it).
_LINGER_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """The scheduler's knobs (module docstring); defaults chosen by benchmarks/scheduler.py."""

    # Predicted prefill seconds a backend may have queued before the router holds the rest.
    budget_s: float = 0.5
    # Seconds of predicted prefill a waiting request gains per second waited (0: pure SPT).
    aging: float = 0.0
    # Hold requests sharing this many uncached prefix tokens with a prefilling one (0: off).
    coalesce_tokens: int = 1024
    # Deployment TTFT deadline (s); None: no admission by deadline (tickets may carry one).
    slo_ttft_s: float | None = None
    # Shed when the predicted TTFT exceeds deadline * shed_factor.
    shed_factor: float = 1.0
    max_queue: int = 1024
    queue_timeout_s: float = 60.0
    # Waiting requests priced per step (the front of the order); the rest wait a step.
    scan: int = 64
    # Requests that can no longer meet this TTFT (waited + predicted prefill past it) go
    # after those that still can; None: slo_ttft_s (and no such rule without one either).
    late_last_s: float | None = None
    # The engines run SGLang's --enable-priority-scheduling: a request whose tenant is under
    # its fair share goes to the engine with a higher `priority` (ahead of the backlogged
    # tenants' queued prefill) and binds past the budget (see "Engine priority").
    engine_priority: bool = False
    # With engine_priority: the share of each backend's budget and running slots that only
    # under-share tenants' requests may use.
    reserve: float = 0.0
    # Admission counts the wait for the requests held ahead at the rate the router binds.
    rate_admission: bool = True
    # While a tenant over its fair share has requests waiting here, its requests bind only
    # to backends whose predicted prefill queue is under `isolation_queue_s` (see "Isolation").
    isolation: bool = True
    isolation_queue_s: float = 0.01
    # Admission counts the requests admitted beyond the pool's throughput with its batches full
    # (see "Throughput admission").
    throughput_admission: bool = True
    # ... at up to this multiple of that rate (bursts above it go into the batches).
    throughput_headroom: float = 1.5
    # The budget's queue counts the decode share of mixed steps once per engine step of up to
    # `step_tokens` (SGLang's default max_prefill_tokens) while the backend's in-flight
    # requests hold under `kv_room_share` of its KV, else once per request (see "Late binding").
    step_tokens: int = 16384
    kv_room_share: float = 0.85

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ValueError("budget_s must be positive")
        if self.aging < 0:
            raise ValueError("aging must be non-negative")
        if self.coalesce_tokens < 0:
            raise ValueError("coalesce_tokens must be non-negative")
        if self.slo_ttft_s is not None and not self.slo_ttft_s > 0:
            raise ValueError("slo_ttft_s must be positive")
        if not self.shed_factor > 0:
            raise ValueError("shed_factor must be positive")
        if self.late_last_s is not None and not self.late_last_s > 0:
            raise ValueError("late_last_s must be positive")
        if not 0 <= self.reserve < 1:
            raise ValueError("reserve must be in [0, 1)")
        if not self.throughput_headroom > 0:
            raise ValueError("throughput_headroom must be positive")
        if not self.isolation_queue_s > 0:
            raise ValueError("isolation_queue_s must be positive")
        if self.max_queue < 1 or self.scan < 1:
            raise ValueError("max_queue and scan must be at least 1")
        if not self.queue_timeout_s > 0:
            raise ValueError("queue_timeout_s must be positive")
        if self.step_tokens < 1 or not self.kv_room_share > 0:
            raise ValueError("step_tokens must be at least 1 and kv_room_share positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ticket:
    """One request waiting to be bound: the routing request plus who sent it and its deadline."""

    req: RouteRequest
    arrival: float
    priority: int = 0  # higher first (SGLang's default order of its `priority` field)
    tenant: str = ""
    deadline_s: float | None = None  # TTFT deadline; None: the deployment's slo_ttft_s

    def __post_init__(self) -> None:
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    """A request the scheduler bound: where it goes, and how long it waited in the router."""

    ticket: Ticket
    decision: Decision
    waited_s: float
    # The `priority` to send the engine (SchedulerConfig.engine_priority); None: send none.
    engine_priority: int | None = None


ShedReason = Literal["queue_full", "slo", "timeout", "no_backend"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Shed:
    """A request the router will not serve: answer 429 (503 for no_backend) with Retry-After."""

    ticket: Ticket
    reason: ShedReason
    retry_after_s: float
    predicted_ttft_s: float | None = None

    @property
    def message(self) -> str:
        if self.reason == "slo":
            return (
                f"predicted time to first token {self.predicted_ttft_s:.2f}s exceeds the "
                "deadline; retry later"
            )
        return {
            "queue_full": "the router's queue is full; retry later",
            "timeout": "the request waited too long in the router's queue; retry later",
            "no_backend": "no backend is available",
        }[self.reason]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleOutput:
    bound: tuple[Bound, ...] = ()
    shed: tuple[Shed, ...] = ()
    wake_at: float | None = None  # call step() again by then if nothing else happens


@runtime_checkable
class QueuePredictor(Protocol):
    """What the cost policy tells the scheduler (router.core.cost_policy.CostPolicy)."""

    def queue_s(self, state: BackendState, now: float) -> float: ...

    def prefill_estimate(self, req: RouteRequest, backends: Sequence[BackendState]) -> float: ...

    def choose(
        self,
        req: RouteRequest,
        backends: Sequence[BackendState],
        now: float,
        *,
        ahead: Mapping[str, float] | None = None,
    ) -> Choice: ...

    def prefill_time(self, state: BackendState, new_tokens: int, context_tokens: int) -> float: ...

    def service_rate(
        self, state: BackendState, prompt_tokens: float, new_tokens: float, prefill_s: float
    ) -> float: ...

    def forget(self, rid: str) -> None: ...

    def track_live_kv(self) -> None: ...

    def budget_queue_s(
        self, state: BackendState, now: float, step_tokens: int, kv_room_share: float
    ) -> float: ...


@dataclass(slots=True)
class _Waiting:
    ticket: Ticket
    prefill_s: float
    key: float  # prefill_s + aging * arrival: smaller goes first
    seq: int
    held_for: str | None = None  # the full backend it waited for at its last pricing
    held_at: float = -math.inf

    def sort_key(self) -> tuple[float, int]:
        return (self.key, self.seq)


@dataclass(slots=True)
class _Lane:
    """One (priority, tenant)'s waiting requests, in release order."""

    items: list[_Waiting] = field(default_factory=list)
    keys: list[tuple[float, int]] = field(default_factory=list)

    def add(self, item: _Waiting) -> None:
        k = item.sort_key()
        i = bisect.bisect_right(self.keys, k)
        self.keys.insert(i, k)
        self.items.insert(i, item)

    def remove(self, item: _Waiting) -> None:
        i = bisect.bisect_left(self.keys, item.sort_key())
        assert self.items[i] is item  # keys are unique (seq)
        del self.keys[i]
        del self.items[i]


class Scheduler:
    """Late binding, phase-aware order, coalescing, admission, fairness: module docstring."""

    def __init__(self, core: RoutingCore, config: SchedulerConfig | None = None) -> None:
        self.core = core
        self.config = config if config is not None else SchedulerConfig()
        policy = core.policy
        self._predictor: QueuePredictor | None = (
            policy if isinstance(policy, QueuePredictor) else None
        )
        if self._predictor is not None:
            self._predictor.track_live_kv()  # for the budget's queue (`_budget_queue_s`)
        self._lanes: dict[tuple[int, str], _Lane] = {}  # (priority, tenant)
        self._items: dict[str, _Waiting] = {}
        # Arrival order, for timeouts; entries of requests that left are skipped lazily.
        self._arrivals: deque[_Waiting] = deque()
        self._served: dict[str, float] = {}  # tenant -> predicted prefill seconds bound
        self._seq = 0
        # Prefix coalescing: block hash -> the leader computing it; leader -> its blocks.
        self._leading: dict[int, str] = {}
        self._leader_blocks: dict[str, tuple[int, ...]] = {}
        self.counters = {
            "submitted": 0, "bound": 0, "shed": 0, "coalesced_waits": 0, "boosted": 0
        }  # fmt: skip
        # Engine priority: bound requests sent with the higher priority, until their first
        # token (rid -> backend, predicted prefill seconds).
        self._boosted: dict[str, tuple[str, float]] = {}
        # Engine priority: tenant -> (prefill seconds bound, decayed over _SHARE_S; as of when).
        self._shares: dict[str, tuple[float, float]] = {}
        self._fair_at = -math.inf  # when _fair (the decayed shares) was computed
        self._fair: dict[str, float] = {}
        # When the last binds happened: the rate at which the pool takes held work.
        self._binds: deque[float] = deque(maxlen=256)
        self.shed_by_reason: dict[str, int] = {}
        # Isolation: when a tenant over its share last had requests waiting here.
        self._flood_seen = -math.inf
        # Throughput admission: recent arrivals' (prompt tokens, predicted prefill seconds),
        # and when the pool, at its full-batch rate, is through the requests admitted so far.
        self._sizes: deque[tuple[int, int, float]] = deque(maxlen=256)
        self._size_sums = [0.0, 0.0, 0.0]
        self._paced_at = -math.inf

    # -- what the driver asks -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def waiting(self, tenant: str | None = None) -> int:
        if tenant is None:
            return len(self._items)
        return sum(1 for w in self._items.values() if w.ticket.tenant == tenant)

    def submit(self, ticket: Ticket, now: float) -> Shed | None:
        """Queue `ticket`, or shed it now (None: queued; call `step` next)."""
        rid = ticket.req.rid
        if rid in self._items:
            raise ValueError(f"request id {rid!r} is already waiting")
        self.counters["submitted"] += 1
        backends = self._routable()
        if not backends:
            return self._count(Shed(ticket=ticket, reason="no_backend", retry_after_s=1.0))
        if len(self._items) >= self.config.max_queue:
            retry = self._drain_s(backends, now, len(self._items))
            return self._count(Shed(ticket=ticket, reason="queue_full", retry_after_s=retry))
        prefill_s = self._prefill_s(ticket.req, backends)
        key = prefill_s + self.config.aging * ticket.arrival
        item = _Waiting(ticket=ticket, prefill_s=prefill_s, key=key, seq=self._seq)
        deadline = ticket.deadline_s if ticket.deadline_s is not None else self.config.slo_ttft_s
        if deadline is not None:
            split = self._isolation(now)
            predicted = self._admission_ttft(item, backends, now, split=split)
            if predicted > deadline * self.config.shed_factor:
                retry = max(1.0, predicted - deadline)
                return self._count(
                    Shed(
                        ticket=ticket, reason="slo", retry_after_s=retry, predicted_ttft_s=predicted
                    )
                )
            # With isolation on, no headroom: the pool takes its full-batch rate and no more,
            # so the flood's batches leave the tenants under their share room to be served.
            self._pace(backends, now, 1.0 if split else self.config.throughput_headroom)
        self._seq += 1
        lane_key = (ticket.priority, ticket.tenant)
        lane = self._lanes.get(lane_key)
        if lane is None:
            lane = self._lanes[lane_key] = _Lane()
        if not self._tenant_active(ticket.tenant):
            # Back from idle: start level with the least-served active tenant (no banked credit).
            active = [self._served.get(t, 0.0) for t in self._active_tenants()]
            floor = min(active) if active else 0.0
            self._served[ticket.tenant] = max(self._served.get(ticket.tenant, 0.0), floor)
        lane.add(item)
        self._items[rid] = item
        self._arrivals.append(item)
        return None

    def cancel(self, rid: str) -> bool:
        """The client went away while waiting: forget it (False if not waiting)."""
        item = self._items.get(rid)
        if item is None:
            return False
        self._drop(item)
        return True

    def step(self, now: float) -> ScheduleOutput:
        """Bind what should go now, shed what waited too long; see the module docstring."""
        shed = self._expire(now)
        if not self._items:
            return ScheduleOutput(shed=tuple(shed))
        backends = self._routable()
        if not backends:
            return ScheduleOutput(shed=tuple(shed), wake_at=self._next_timeout())
        budget = self.config.budget_s
        queue = {s.id: self._budget_queue_s(s, now) for s in backends}
        ahead: dict[str, float] = dict.fromkeys(queue, 0.0)
        # Running slots left (the engine admits no more than max_running_requests; past that
        # a bound request waits inside the engine where no order of ours applies).
        slots = {
            s.id: math.inf if s.spec.max_running_requests is None
            else s.spec.max_running_requests - len(s.in_flight)
            for s in backends
        }  # fmt: skip
        boosted = self._boosted_work()
        split = self._isolation(now)
        # With engine priority, a slice of each backend is kept for under-share tenants.
        keep = self.config.reserve if boosted is not None else 0.0
        kept = {s.id: keep * (s.spec.max_running_requests or 0) for s in backends}

        # With isolation on, an under-share request sees only the under-share requests held
        # ahead of it (`ahead_under`, `waiting_under`): the over-share ones wait for queues
        # it does not wait for.
        ahead_under: dict[str, float] = dict.fromkeys(queue, 0.0)
        waiting: dict[str, int] = dict.fromkeys(queue, 0)
        waiting_under: dict[str, int] = dict.fromkeys(queue, 0)

        def room(b: str, cap: float = budget, under: bool = False) -> bool:
            held_s, held_n = (ahead_under, waiting_under) if under else (ahead, waiting)
            return queue[b] + held_s[b] < cap * (1 - keep) and slots[b] - held_n[b] - kept[b] >= 1

        # Seconds the requests held for a backend past its free running slots wait for its
        # running requests to finish, added to their prefill in the price: one `_slot_gap_s`
        # each (`gaps`: this step's, per backend).
        slot_wait: dict[str, float] = dict.fromkeys(queue, 0.0)
        gaps: dict[str, float] = {}
        by_id = {s.id: s for s in backends}

        def wait_for(b: str, item: _Waiting, under: bool) -> None:
            ahead[b] += item.prefill_s  # later requests see b busier
            waiting[b] += 1
            if waiting[b] + kept[b] > slots[b]:
                gap = gaps.get(b)
                if gap is None:
                    gap = gaps[b] = self._slot_gap_s(by_id[b])
                slot_wait[b] += gap
            if under:
                ahead_under[b] += item.prefill_s
                waiting_under[b] += 1

        bound: list[Bound] = []
        scanned = 0
        more = False  # stopped at the scan limit with room left: step again soon
        for item in self._release_order(now):
            if scanned >= self.config.scan:
                # Step again at once only if this one made progress: when every request
                # looked at waits for a full backend, pricing the same ones again every tick
                # changes nothing until an event or a queue falls under the budget.
                more = bool(bound)
                break
            boost = self._under_share(item.ticket.tenant, now)
            cap = budget
            under = split and self._below_share(item.ticket.tenant, now)
            if split and not under:
                cap = min(budget, self.config.isolation_queue_s)
            if not boost and not any(room(b, cap, under) for b in queue):
                if boosted is None and not split:
                    break
                continue  # an under-share tenant's request further on may still bind
            scanned += 1
            req = item.ticket.req
            held = item.held_for
            if (
                not boost
                and held in queue
                and not room(held, cap, under)
                and now < item.held_at + _REPRICE_S
            ):
                wait_for(held, item, under)  # still waiting for a full backend: no new price
                continue
            if self._waits_for_leader(req, now):
                continue
            if boost and boosted is not None:
                # It goes ahead of the engines' queued prefill, but SGLang fills its prefill
                # step with that queue (up to max_prefill_tokens): priced with the queue, plus
                # the boosted work ahead of it; only where a running slot is free (past that it
                # would wait inside the engine).
                held_n = waiting_under if under else waiting
                free = [
                    s for s in backends
                    if slots[s.id] - held_n[s.id] >= 1 and boosted.get(s.id, 0.0) < budget
                ]  # fmt: skip
                if not free:
                    continue
                choice = self._choose(req, free, now, dict(boosted))
                b = choice.backend
            else:
                held_ahead = ahead_under if under else ahead
                if not under and any(slot_wait.values()):
                    held_ahead = {b: v + slot_wait[b] for b, v in held_ahead.items()}
                if under:
                    choice = self._fastest(req, backends, now, held_ahead)
                else:
                    choice = self._choose(req, backends, now, held_ahead)
                b = choice.backend
                if not room(b, cap, under):
                    roomy = [s for s in backends if room(s.id, cap, under)]
                    alt = self._no_wait(req, choice, roomy, now, held_ahead)
                    if alt is None:
                        wait_for(b, item, under)
                        item.held_for, item.held_at = b, now
                        continue
                    choice, b = alt, alt.backend
            try:
                decision = self.core.route(req, now, choice=choice)
            except NoBackendError:  # cannot happen with routable backends; keep it waiting
                continue
            self._drop(item)
            self._binds.append(now)
            self.counters["bound"] += 1
            self._served[item.ticket.tenant] = (
                self._served.get(item.ticket.tenant, 0.0) + item.prefill_s
            )
            if self._tracks_shares:
                self._charge(item.ticket.tenant, item.prefill_s, now)
            self._lead(req, decision)
            self._note_size(
                req.prompt_tokens,
                req.prompt_tokens - decision.predicted_cached_tokens,
                choice.explain.prefill_s if choice.explain is not None else item.prefill_s,
            )
            state = by_id[b]
            queue[b] = self._budget_queue_s(state, now)
            slots[b] -= 1
            engine_priority: int | None = None
            if boosted is not None:
                engine_priority = 2 * item.ticket.priority + (1 if boost else 0)
                if boost:
                    boosted[b] = boosted.get(b, 0.0) + item.prefill_s
                    self._boosted[req.rid] = (b, item.prefill_s)
                    self.counters["boosted"] += 1
            bound.append(
                Bound(
                    ticket=item.ticket,
                    decision=decision,
                    waited_s=now - item.ticket.arrival,
                    engine_priority=engine_priority,
                )
            )
        # With isolation on, an over-share request waits for a queue to fall under the cap.
        floor = min(budget, self.config.isolation_queue_s) if split else budget
        wake = now + _MIN_TICK_S if more and self._items else self._wake_at(queue, now, floor)
        return ScheduleOutput(bound=tuple(bound), shed=tuple(shed), wake_at=wake)

    def stats(self) -> dict[str, object]:
        """A JSON-able snapshot for /stats."""
        return {
            "waiting": len(self._items),
            "waiting_by_tenant": self._by_tenant(),
            "served_s_by_tenant": dict(self._served),
            "leaders": len(self._leader_blocks),
            **self.counters,
            "shed_by_reason": dict(self.shed_by_reason),
            "config": {
                "budget_s": self.config.budget_s,
                "aging": self.config.aging,
                "coalesce_tokens": self.config.coalesce_tokens,
                "slo_ttft_s": self.config.slo_ttft_s,
                "shed_factor": self.config.shed_factor,
                "max_queue": self.config.max_queue,
                "queue_timeout_s": self.config.queue_timeout_s,
                "engine_priority": self.config.engine_priority,
                "isolation": self.config.isolation,
                "throughput_admission": self.config.throughput_admission,
                "throughput_headroom": self.config.throughput_headroom,
                "step_tokens": self.config.step_tokens,
                "kv_room_share": self.config.kv_room_share,
            },
        }

    # -- predictions ------------------------------------------------------------------------

    def _routable(self) -> list[BackendState]:
        return [s for s in self.core.backends() if s.routable]

    def _queue_s(self, state: BackendState, now: float) -> float:
        if self._predictor is not None:
            return self._predictor.queue_s(state, now)
        return state.pending_prefill_tokens / DEFAULT_PP

    def _budget_queue_s(self, state: BackendState, now: float) -> float:
        """The queue the budget compares with (`CostPolicy.budget_queue_s`)."""
        if self._predictor is not None:
            return self._predictor.budget_queue_s(
                state, now, self.config.step_tokens, self.config.kv_room_share
            )
        return self._queue_s(state, now)

    def _prefill_s(self, req: RouteRequest, backends: Sequence[BackendState]) -> float:
        if self._predictor is not None:
            return self._predictor.prefill_estimate(req, backends)
        return req.prompt_tokens / DEFAULT_PP

    def _choose(
        self,
        req: RouteRequest,
        backends: Sequence[BackendState],
        now: float,
        ahead: dict[str, float],
    ) -> Choice:
        if self._predictor is not None:
            return self._predictor.choose(req, backends, now, ahead=ahead)
        return self.core.policy.choose(req, backends, now)

    def _fastest(
        self,
        req: RouteRequest,
        backends: Sequence[BackendState],
        now: float,
        ahead: dict[str, float],
    ) -> Choice:
        """The backend with the lowest predicted TTFT (isolation's under-share requests).

        The policy's whole cost also prices the decode steps the request will share and what
        its prefill does to the streams running there; beside a flood whose batches fill every
        backend, that sent the light tenant's requests to the few backends the flood had least
        of, where they queued behind each other (fairness seed 3: p90 0.184 s by cost, 0.133 s
        by TTFT; solo 0.088 s).
        """
        if self._predictor is None or len(backends) < 2:
            return self._choose(req, backends, now, ahead)
        best, best_ttft = backends[0], math.inf
        for state in backends:
            ttft = self._predictor.choose(req, [state], now, ahead=ahead).predicted_ttft_s
            if ttft is not None and ttft < best_ttft:
                best, best_ttft = state, ttft
        # Priced once more alone: the policy keeps what it says of the last choice it made.
        return self._choose(req, [best], now, ahead)

    def _no_wait(
        self,
        req: RouteRequest,
        choice: Choice,
        roomy: Sequence[BackendState],
        now: float,
        ahead: dict[str, float],
    ) -> Choice | None:
        """A backend with room that is as good for `req` now as the full one it would wait for.

        The policy may pick a backend with no room (past its budget or its running slots) for
        terms other than the first token: the decode step its batch shares, its prefill's
        interference with the streams running there. Waiting here for it then costs a TTFT the
        policy did not price: the held request waits while shorter arrivals go first (SPT).
        If a backend with room predicts a first token no later, with no less of the prompt
        cached (so no locality is given up: the wait for a cached prefix stays), bind there now.
        On the conversation trace at 1.05x capacity, 1,227 of the 1,547 requests that missed
        2 s though their own prefill fit in it had waited here over 0.2 s while some backend
        had room, with a median 2.6% of their prompt cached where they went.
        """
        if not roomy or choice.predicted_ttft_s is None or self._predictor is None:
            return None
        alt = self._fastest(req, roomy, now, ahead)
        if (
            alt.predicted_ttft_s is None
            or alt.predicted_ttft_s > choice.predicted_ttft_s
            or alt.predicted_cached_tokens < choice.predicted_cached_tokens
        ):
            return None
        return alt

    def _admission_ttft(
        self,
        item: _Waiting,
        backends: Sequence[BackendState],
        now: float,
        *,
        split: bool = False,
    ) -> float:
        """Predicted TTFT of a newcomer: the larger of two prices of the work released first.

        Spread: the pool's queue and that held work shared over every backend. Placed: the
        policy's own price at the backend it would pick, with the held work that waits for a
        backend counted there. Requests waiting for the backend that caches their prefix do not
        spread, so on prefix-heavy traffic the spread price alone admitted requests that then
        waited far past their deadline (multi-turn at 2x capacity: admitted p90 13 s, SLO 2 s).
        With isolation on (`split`), only the held work of its side (the under-share tenants,
        or the rest) counts: the two bind to the engines independently.
        """
        if self._predictor is not None and self._under_share(item.ticket.tenant, now):
            # It goes next here (fair share), and ahead of the engines' queues (priority) but
            # in a prefill step they fill: the policy's price with the boosted work added.
            boosted = self._boosted_work() or {}
            placed = self._predictor.choose(item.ticket.req, backends, now, ahead=boosted)
            self._predictor.forget(item.ticket.req.rid)
            return placed.predicted_ttft_s or item.prefill_s
        queues = [self._queue_s(s, now) for s in backends]
        below = self._below_share(item.ticket.tenant, now) if split else False
        held = [
            w for w in self._items.values()
            if not split or self._below_share(w.ticket.tenant, now) == below
        ]  # fmt: skip
        first = [
            w
            for w in held
            if w.ticket.priority > item.ticket.priority
            or (w.ticket.priority == item.ticket.priority and w.key <= item.key)
        ]
        spread = (sum(queues) + sum(w.prefill_s for w in first)) / len(backends)
        predicted = max(spread, min(queues)) + item.prefill_s
        rate = self._bind_rate(now)
        if self.config.rate_admission and rate is not None:
            # The requests held ahead of it bind first, at the rate the pool has been taking
            # them: this also prices waits the prefill figures do not see (running slots,
            # locality waits, shorter requests that arrive later and go first).
            ahead_n = self._held_ahead(item, held)
            predicted = max(predicted, ahead_n / rate + min(queues) + item.prefill_s)
        if self._predictor is None:
            return predicted
        if self.config.throughput_admission and not self._below_share(item.ticket.tenant, now):
            # The pool works through what was admitted at its full-batch rate at best (a
            # tenant under its share goes ahead of the others' excess: fair queueing).
            predicted = max(predicted, self._paced_at - now + item.prefill_s)
        ahead = dict.fromkeys((s.id for s in backends), 0.0)
        loose = 0.0
        for w in first:
            if w.held_for in ahead:
                ahead[w.held_for] += w.prefill_s
            else:
                loose += w.prefill_s
        for backend in ahead:
            ahead[backend] += loose / len(backends)
        rid = item.ticket.req.rid
        placed = self._predictor.choose(item.ticket.req, backends, now, ahead=ahead)
        self._predictor.forget(rid)  # a price, not a routing: step() prices it again
        if placed.predicted_ttft_s is not None:
            predicted = max(predicted, placed.predicted_ttft_s)
        return predicted

    def _note_size(self, prompt_tokens: int, new_tokens: int, prefill_s: float) -> None:
        """A bound request's size, as the policy priced it where it went."""
        sizes, sums = self._sizes, self._size_sums
        if len(sizes) == sizes.maxlen:
            for i, old in enumerate(sizes[0]):
                sums[i] -= old
        sizes.append((prompt_tokens, new_tokens, prefill_s))
        for i, value in enumerate((prompt_tokens, new_tokens, prefill_s)):
            sums[i] += value

    def _pace(self, backends: Sequence[BackendState], now: float, headroom: float) -> None:
        """Count one admitted request against `headroom` x the pool's full-batch throughput."""
        if not self.config.throughput_admission or self._predictor is None:
            return
        if not self._sizes:
            return
        rate = sum(self._full_batch_rate(s) for s in backends) * headroom
        if 0 < rate < math.inf:
            self._paced_at = max(self._paced_at, now) + 1.0 / rate

    def _full_batch_rate(self, state: BackendState) -> float:
        """Requests per second `state` completes with its batch full, for requests of the mean
        size bound lately (`CostPolicy.service_rate`; call with sizes noted and a predictor)."""
        assert self._predictor is not None and self._sizes
        n = len(self._sizes)
        tokens, new, prefill_s = (total / n for total in self._size_sums)
        return self._predictor.service_rate(state, tokens, new, prefill_s)

    def _slot_gap_s(self, state: BackendState) -> float:
        """Seconds between two requests finishing on `state` with its batch full: what one
        more request held for it past its free running slots waits (0 with nothing to go by).

        The prefill seconds held for a backend do not see that wait, so the requests behind
        kept choosing a backend whose slots were taken: multi-turn capacity 1.05-1.07x ->
        1.07-1.09x with it, before the budget's own queue changed (benchmarks/README.md).
        """
        if self._predictor is None or not self._sizes:
            return 0.0
        rate = self._full_batch_rate(state)
        return 1.0 / rate if 0 < rate < math.inf else 0.0

    def _held_ahead(self, item: _Waiting, held: Iterable[_Waiting]) -> int:
        """Held requests that bind before `item`: all of higher priority; within its priority
        all of its own tenant's, and of each other tenant as many as its own plus one (fair
        queueing interleaves tenants, so a flood's backlog is not ahead of a light tenant)."""
        counts: dict[str, int] = {}
        ahead = 0
        for w in held:
            if w.ticket.priority > item.ticket.priority:
                ahead += 1
            elif w.ticket.priority == item.ticket.priority:
                counts[w.ticket.tenant] = counts.get(w.ticket.tenant, 0) + 1
        own = counts.pop(item.ticket.tenant, 0)
        return ahead + own + sum(min(n, own + 1) for n in counts.values())

    def _bind_rate(self, now: float) -> float | None:
        """Requests bound per second over the last binds (None: too few to tell)."""
        binds = self._binds
        if len(binds) < 16 or now <= binds[0]:
            return None
        return (len(binds) - 1) / (now - binds[0])

    def _drain_s(self, backends: Sequence[BackendState], now: float, count: int) -> float:
        """Seconds until the pool works through its queues and the held work (Retry-After)."""
        held = sum(w.prefill_s for w in self._items.values())
        total = sum(self._queue_s(s, now) for s in backends) + held
        return max(1.0, total / len(backends))

    # -- order and fairness -------------------------------------------------------------------

    @property
    def _tracks_shares(self) -> bool:
        return self.config.engine_priority or self.config.isolation

    def _under_share(self, tenant: str, now: float) -> bool:
        """Engine priority applies to `tenant` now (it is below its share)."""
        return self.config.engine_priority and self._below_share(tenant, now)

    def _below_share(self, tenant: str, now: float) -> bool:
        """`tenant` got less than an equal share of the prefill bound lately.

        Shares are predicted prefill seconds bound, decayed over `_SHARE_S`, among the tenants
        that got any; a tenant alone is never under its share.
        """
        if not self._tracks_shares:
            return False
        shares = self._fair_shares(now)
        count = len(shares) + (tenant not in shares)
        if count < 2:
            return False
        return shares.get(tenant, 0.0) < sum(shares.values()) / count

    def _fair_shares(self, now: float) -> dict[str, float]:
        if self._fair_at != now:  # once per instant: a step asks for every request it looks at
            shares = {t: self._share(t, now) for t in self._shares}
            for t in [t for t, v in shares.items() if v < 1e-6]:  # long gone: forget
                del self._shares[t], shares[t]
            self._fair_at, self._fair = now, shares
        return self._fair

    def _isolation(self, now: float) -> bool:
        """Whether isolation is on now: a tenant over its share has requests waiting here and
        another is under its share (or that held less than `_LINGER_S` ago)."""
        if not self.config.isolation:
            return False
        shares = self._fair_shares(now)
        if len(shares) >= 2:
            fair = sum(shares.values()) / len(shares)
            if any(v < fair for v in shares.values()) and any(
                v > fair and self._tenant_active(t) for t, v in shares.items()
            ):
                self._flood_seen = now
        return now - self._flood_seen <= _LINGER_S

    def _share(self, tenant: str, now: float) -> float:
        value, at = self._shares[tenant]
        return value * math.exp(-(now - at) / _SHARE_S)

    def _charge(self, tenant: str, prefill_s: float, now: float) -> None:
        value = self._share(tenant, now) if tenant in self._shares else 0.0
        self._shares[tenant] = (value + prefill_s, now)
        self._fair_at = -math.inf  # the shares changed

    def _boosted_work(self) -> dict[str, float] | None:
        """Predicted prefill seconds of boosted requests not yet at their first token."""
        if not self.config.engine_priority:
            return None
        out: dict[str, float] = {}
        for rid, (backend, prefill_s) in list(self._boosted.items()):
            rec = self.core.record(rid)
            if rec is None or rec.first_token_at is not None:
                del self._boosted[rid]
                continue
            out[backend] = out.get(backend, 0.0) + prefill_s
        return out

    def _active_tenants(self) -> set[str]:
        return {tenant for (_, tenant), lane in self._lanes.items() if lane.items}

    def _tenant_active(self, tenant: str) -> bool:
        return any(lane.items for (_, t), lane in self._lanes.items() if t == tenant)

    def _by_tenant(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, tenant), lane in self._lanes.items():
            if lane.items:
                out[tenant] = out.get(tenant, 0) + len(lane.items)
        return out

    def _release_order(self, now: float) -> Iterator[_Waiting]:
        """Waiting requests in the order they may bind: priority, fair share, aged SPT.

        Within a priority the next request comes from the tenant with the least service,
        counting what this pass already offered, so tenants interleave in proportion.
        """
        for priority in sorted(
            {p for (p, _), lane in self._lanes.items() if lane.items}, reverse=True
        ):
            lanes = {
                tenant: lane
                for (p, tenant), lane in self._lanes.items()
                if p == priority and lane.items
            }
            # With shares tracked, service counts over the share window (the same decayed
            # shares that isolation judges by), else since the start.
            served = self._fair_shares(now) if self._tracks_shares else self._served
            offered = {tenant: served.get(tenant, 0.0) for tenant in lanes}
            positions = dict.fromkeys(lanes, 0)
            # A step looks at no more than `scan` requests, so no lane gives more than that
            # (a copy: binding removes items from the lanes while this generator runs).
            scan = self.config.scan
            target = self.config.late_last_s or self.config.slo_ttft_s
            if target is None:
                snapshot = {tenant: lane.items[:scan] for tenant, lane in lanes.items()}
            else:
                snapshot = {
                    tenant: self._front(lane.items, now, target, scan)
                    for tenant, lane in lanes.items()
                }
            while positions:
                tenant = min(positions, key=lambda t: (offered[t], t))
                i = positions[tenant]
                items = snapshot[tenant]
                item = items[i]
                if i + 1 < len(items):
                    positions[tenant] = i + 1
                else:
                    del positions[tenant]
                offered[tenant] += max(item.prefill_s, 1e-3)
                if item.ticket.req.rid in self._items:
                    yield item

    def _front(
        self, items: Sequence[_Waiting], now: float, target: float, scan: int
    ) -> list[_Waiting]:
        """The first `scan` of a lane's requests, those that can still meet `target` first.

        The search goes as deep as it must: in a backlog whose front is all late (a burst
        on a large pool), the requests still on time sit further back, and looking at a
        fixed front instead (4 x scan) left them to go late in turn.
        """
        on_time: list[_Waiting] = []
        late: list[_Waiting] = []
        for w in items:
            if self._slack(w, now, target) < 0:
                if len(late) < scan:
                    late.append(w)
            else:
                on_time.append(w)
                if len(on_time) == scan:
                    break
        return (on_time + late)[:scan]

    def _slack(self, w: _Waiting, now: float, target: float) -> float:
        """Seconds `w` may still wait here and meet its deadline once bound at an idle backend."""
        deadline = w.ticket.deadline_s if w.ticket.deadline_s is not None else target
        return w.ticket.arrival + deadline - now - w.prefill_s

    # -- coalescing ----------------------------------------------------------------------------

    def _lead(self, req: RouteRequest, decision: Decision) -> None:
        """Remember a bound request's uncached blocks while it prefills them."""
        min_tokens = self.config.coalesce_tokens
        if min_tokens <= 0 or not req.first_token_seen:
            return
        if req.prompt_tokens - decision.predicted_cached_tokens < min_tokens:
            return
        start = decision.predicted_cached_tokens // req.block_tokens
        blocks = req.blocks[start:]
        if not blocks:
            return
        self._leader_blocks[req.rid] = blocks
        for h in blocks:
            self._leading[h] = req.rid

    def _waits_for_leader(self, req: RouteRequest, now: float) -> bool:
        """True if `req` shares enough uncached prefix with a request still prefilling it."""
        min_tokens = self.config.coalesce_tokens
        if min_tokens <= 0 or not self._leading:
            return False
        shared = 0
        leader: str | None = None
        for h in req.blocks:
            rid = self._leading.get(h)
            if rid is None:
                break
            leader = rid
            shared += 1
        if leader is None or req.tokens_in_blocks(shared) < min_tokens:
            return False
        rec = self.core.record(leader)
        if rec is None or rec.first_token_at is not None:
            self._unlead(leader)  # its prefix is computed (or it failed): stop waiting on it
            return self._waits_for_leader(req, now)
        # Only the part of the prefix the leader computes counts (not what was cached).
        first = self._leader_blocks[leader][0]
        try:
            shared_new = shared - req.blocks.index(first)
        except ValueError:
            return False
        if req.tokens_in_blocks(shared_new) < min_tokens:
            return False
        # Wait only while the leader is predicted to finish the prefix sooner than this
        # request could compute it itself (at the leader's backend's speed).
        remaining = rec.routed_at + (rec.predicted_ttft_s or 0.0) - now
        tokens = req.tokens_in_blocks(shared_new)
        state = next((s for s in self.core.backends() if s.id == rec.backend), None)
        if self._predictor is not None and state is not None:
            recompute_s = self._predictor.prefill_time(state, tokens, tokens)
        else:
            recompute_s = tokens / DEFAULT_PP
        if remaining > recompute_s:
            return False
        self.counters["coalesced_waits"] += 1
        return True

    def _unlead(self, rid: str) -> None:
        for h in self._leader_blocks.pop(rid, ()):
            if self._leading.get(h) == rid:
                del self._leading[h]

    # -- bookkeeping ---------------------------------------------------------------------------

    def _drop(self, item: _Waiting) -> None:
        del self._items[item.ticket.req.rid]
        self._lanes[(item.ticket.priority, item.ticket.tenant)].remove(item)

    def _count(self, shed: Shed) -> Shed:
        self.counters["shed"] += 1
        self.shed_by_reason[shed.reason] = self.shed_by_reason.get(shed.reason, 0) + 1
        if self._predictor is not None:
            self._predictor.forget(shed.ticket.req.rid)
        return shed

    def _oldest(self) -> _Waiting | None:
        """The longest-waiting request still waiting (drops the departed from the front)."""
        arrivals = self._arrivals
        while arrivals and self._items.get(arrivals[0].ticket.req.rid) is not arrivals[0]:
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def _expire(self, now: float) -> list[Shed]:
        timeout = self.config.queue_timeout_s
        out = []
        # The same sum as `_next_timeout`: `now - arrival >= timeout` can miss by one ulp at the
        # very instant the driver was asked to wake, and that instant then repeats forever.
        while (item := self._oldest()) is not None and now >= item.ticket.arrival + timeout:
            self._drop(item)
            out.append(self._count(Shed(ticket=item.ticket, reason="timeout", retry_after_s=1.0)))
        if len(self._leader_blocks) > 4 * self.config.scan:  # leaders no one asked about
            for rid in list(self._leader_blocks):
                rec = self.core.record(rid)
                if rec is None or rec.first_token_at is not None:
                    self._unlead(rid)
        return out

    def _next_timeout(self) -> float | None:
        oldest = self._oldest()
        return None if oldest is None else oldest.ticket.arrival + self.config.queue_timeout_s

    def _wake_at(self, queue: Mapping[str, float], now: float, budget: float) -> float | None:
        """When a backend's predicted queue falls under `budget` (or a wait times out)."""
        if not self._items:
            return None
        # Only a backend over budget frees room by itself (its queue burns down); the rest
        # changes with events (a first token, a finish) the driver steps on anyway.
        over = [queue[b] - budget for b in queue if queue[b] >= budget]
        wake = now + max(min(over), _MIN_TICK_S) if over else math.inf
        timeout = self._next_timeout()
        soonest = wake if timeout is None else min(wake, timeout)
        return None if soonest == math.inf else soonest


def retry_after_header(shed: Shed) -> str:
    """Retry-After in whole seconds, at least 1."""
    return str(max(1, math.ceil(shed.retry_after_s)))


def headroom_knobs(headroom: float) -> dict[str, Any]:
    """The `SchedulerConfig` fields for a `--scheduler-headroom` value (0: throughput
    admission off)."""
    if headroom > 0:
        return {"throughput_headroom": headroom}
    return {"throughput_admission": False}


def parse_headroom(text: str) -> float:
    """`--scheduler-headroom`'s value: a non-negative number, or 'off' (0.0: no throughput
    admission); ValueError otherwise."""
    if text.strip().lower() == "off":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"expected a non-negative number or 'off', got {text!r}")
    return value
