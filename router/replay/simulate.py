"""Virtual-time simulation of a whole pool: a trace, N simulated engines, one routing policy.

The loop is the live proxy's life with the sockets taken out::

    for each request, in arrival order (timestamps / load):
        advance every engine to the arrival time; feed their events to the RoutingCore
            (FirstToken -> on_first_token, Finished -> on_finished, Aborted -> on_failed)
        core.route(request, now) -> backend; engine[backend].add_request(...)
    then run the engines dry the same way.

The router only learns what the live proxy would learn (first token, finish, reported cached
tokens), so the policy's decisions here are the decisions it makes in production. Only the
`oracle` policy is given a probe into the engines' true cache and queue.

With `SimConfig.scheduler` set, requests go through the router's scheduler
(router.core.scheduler) instead of binding on arrival: each arrival is submitted, and the
scheduler is stepped at every arrival, at every engine event (first token, finish) while it
holds requests, and when it asks (`wake_at`), as the live proxy steps it. What it binds goes
to that engine at that moment; what it sheds ends as a failed outcome ("shed: <reason>"), so
capacity searches count it as a failure.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.sim.api import Aborted, Finished, FirstToken, SimRequest
from backends.sim.engine import Engine, EngineConfig
from backends.sim.kvevents import AllBlocksCleared, BlockStored, KVEvent
from backends.sim.perf import Profile, get_profile
from router.core.blocks import route_request_from_hash_ids
from router.core.index import PrefixIndex
from router.core.model import BackendSpec, RouteRequest
from router.core.policies import make_policy
from router.core.routing import Decision, RoutingCore
from router.core.scheduler import Scheduler, SchedulerConfig, Shed, Ticket
from router.priors import prior_from_profile
from router.replay.metrics import RequestOutcome, percentile, summarize
from router.replay.traces import Trace, TraceRequest
from router.replay.views import ViewSync

__all__ = [
    "CapacityResult",
    "EngineProbe",
    "PolicyRun",
    "SimConfig",
    "capacity_p90",
    "find_capacity",
    "simulate_policy",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """One simulated pool. `profiles` has one per backend (heterogeneous pools allowed).

    `believed` optionally gives the profile the router is told each backend runs (its prior);
    by default the router is told the truth. Calibration tests lie to it on purpose.
    """

    profiles: tuple[str | Profile, ...]
    believed: tuple[str | Profile, ...] | None = None
    load: float = 1.0
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy_options: dict[str, Any] = field(default_factory=dict)
    # the engines publish KV events and the policy's prefix index follows them (as `serve` does
    # with SGLang's), instead of its modelled LRU
    kv_events: bool = False
    # None: bind every request on arrival (no router-side scheduler).
    scheduler: SchedulerConfig | None = None
    # TTFT a request must meet to count towards goodput_rps.
    goodput_slo_s: float = 2.0
    # `serve --workers N` (router/replay/views.py): arrivals dealt to N routing views in turn,
    # each hearing the others' routing events `sync_delay_s` later (inf: sharing nothing)
    views: int = 1
    sync_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ValueError("a pool needs at least one backend")
        if not self.load > 0:
            raise ValueError("load must be positive")
        if self.believed is not None and len(self.believed) != len(self.profiles):
            raise ValueError("believed needs one profile per backend")
        if self.views < 1 or not self.sync_delay_s >= 0:
            raise ValueError("views must be >= 1 and sync_delay_s >= 0")
        if self.views > 1 and (self.scheduler is not None or self.kv_events):
            raise ValueError("several views run without the scheduler and KV events")


def apply_kv_events(
    index: PrefixIndex,
    backend: str,
    events: list[KVEvent],
    now: float,
    tiers: dict[int, int] | None = None,
) -> None:
    """A simulated engine's cache events -> its entries in the index.

    The engine's cache units are the requests' blocks (trace hash ids), so its block hashes
    are the router's: no token mapping is needed, unlike SGLang's (router/core/kv_mirror).
    A block counts while either tier holds it (device, or the HiCache host pool it loads back
    from), as the modelled cache counts both: `tiers` (block -> bit 1 device, bit 2 host, kept
    by the caller per backend) says which; without it only the device tier counts.
    """
    for event in events:
        if isinstance(event, AllBlocksCleared):
            index.clear_backend(backend)
            if tiers is not None:
                tiers.clear()
            continue
        bit = 1 if event.medium == "GPU" else 2
        if tiers is None:
            if bit != 1:
                continue
            if isinstance(event, BlockStored):
                index.apply_stored(backend, event.block_hashes, now)
            else:
                index.apply_removed(backend, event.block_hashes)
            continue
        if isinstance(event, BlockStored):
            new = [b for b in event.block_hashes if not tiers.get(b)]
            for b in event.block_hashes:
                tiers[b] = tiers.get(b, 0) | bit
            if new:
                index.apply_stored(backend, new, now)
        else:
            gone = []
            for b in event.block_hashes:
                held = tiers.get(b, 0) & ~bit
                if held:
                    tiers[b] = held
                elif tiers.pop(b, None) is not None:
                    gone.append(b)
            if gone:
                index.apply_removed(backend, gone)


def _profile(item: str | Profile) -> Profile:
    return item if isinstance(item, Profile) else get_profile(item)


class EngineProbe:
    """The oracle's window into the engines: true cached tokens and true queue wait."""

    def __init__(self, engines: dict[str, Engine]) -> None:
        self._engines = engines

    def cached_tokens(self, backend: str, req: RouteRequest) -> int:
        sim = _sim_request(req, output_tokens=1)
        probe = self._engines[backend].probe(sim)
        return probe.device_tokens + probe.host_tokens

    def wait_s(self, backend: str, now: float) -> float:
        return self._engines[backend].predicted_wait_s(now)


def _sim_request(
    req: RouteRequest, *, output_tokens: int, priority: int | None = None
) -> SimRequest:
    return SimRequest(
        rid=req.rid,
        blocks=req.blocks,
        block_size=req.block_tokens,
        prompt_tokens=req.prompt_tokens,
        output_tokens=output_tokens,
        priority=priority,
    )


@dataclass(slots=True, kw_only=True)
class _Live:
    arrival: float
    req: RouteRequest
    backend: str


@dataclass(slots=True, kw_only=True)
class PolicyRun:
    """Everything one policy's run produced: per-request outcomes, the summary, the core's stats."""

    policy: str
    outcomes: list[RequestOutcome]
    summary: dict[str, Any]
    stats: dict[str, Any]
    core: RoutingCore  # what the router ended up believing (learned speeds, index)
    # rid -> the TTFT the policy predicted at routing, where it predicts one (cost, oracle)
    predicted_ttft: dict[str, float] = field(default_factory=dict)


def _backend_ids(count: int) -> list[str]:
    return [f"b{i}" for i in range(count)]


def simulate_policy(
    trace: Trace,
    policy: str,
    config: SimConfig,
    *,
    on_request: Callable[[], None] | None = None,
    tenant_of: Callable[[TraceRequest], str] | None = None,
) -> PolicyRun:
    """Run `trace` through fresh engines routed by `policy`; every request ends in an outcome.

    `tenant_of` names each request's tenant (for the scheduler's fairness and a per-tenant
    summary under `summary["tenants"]`).
    """
    started = time.perf_counter()
    ids = _backend_ids(len(config.profiles))
    profiles = {bid: _profile(item) for bid, item in zip(ids, config.profiles, strict=True)}
    believed = {
        bid: _profile(item)
        for bid, item in zip(ids, config.believed or config.profiles, strict=True)
    }
    engine_config = config.engine
    if config.kv_events and not engine_config.enable_kv_events:
        engine_config = dataclasses.replace(engine_config, enable_kv_events=True)
    if config.scheduler is not None and config.scheduler.engine_priority:
        # the scheduler sends priorities: the engines run --enable-priority-scheduling
        engine_config = dataclasses.replace(engine_config, enable_priority_scheduling=True)
    engines = {bid: Engine(profiles[bid], engine_config) for bid in ids}
    specs = [
        BackendSpec(
            id=bid,
            kv_capacity_tokens=profiles[bid].kv_capacity_tokens,
            host_cache_tokens=profiles[bid].host_capacity_tokens,
            prior=prior_from_profile(believed[bid]),
            max_running_requests=config.engine.max_running_requests,
        )
        for bid in ids
    ]
    chosen = make_policy(policy, rng=random.Random(config.seed), **config.policy_options)
    bind = getattr(chosen, "bind_probe", None)
    if bind is not None:
        bind(EngineProbe(engines))
    core = RoutingCore(chosen, specs)
    views = ViewSync(
        [core] + [
            RoutingCore(make_policy(policy, rng=random.Random(config.seed + k),
                                    **config.policy_options), specs)
            for k in range(1, config.views)
        ],
        config.sync_delay_s,
    ) if config.views > 1 else None  # fmt: skip
    index = getattr(chosen, "index", None)
    events_to = index if config.kv_events and isinstance(index, PrefixIndex) else None
    tiers: dict[str, dict[int, int]] = {bid: {} for bid in ids}
    if events_to is not None:
        for bid in ids:
            events_to.set_event_driven(bid, True)

    live: dict[str, _Live] = {}
    outcomes: list[RequestOutcome] = []
    predicted: dict[str, float] = {}

    def finish(rid: str, event: Finished | Aborted) -> None:
        item = live.pop(rid)
        owner = core if views is None else views.core_of(rid)
        if views is not None:
            views.ended(rid, item.backend, event.time)
        if isinstance(event, Aborted):
            owner.on_failed(rid, event.time)
            outcomes.append(_failed(rid, item, "aborted"))
            return
        owner.on_finished(rid, event.time, event.output_tokens, event.cached_tokens)
        ttft = event.first_token_time - item.arrival
        decode = event.time - event.first_token_time
        tpot = decode / (event.output_tokens - 1) if event.output_tokens > 1 else None
        outcomes.append(
            RequestOutcome(
                rid=rid,
                arrival=item.arrival,
                prompt_tokens=event.prompt_tokens,
                output_tokens=event.output_tokens,
                cached_tokens=event.cached_tokens,
                ttft=ttft,
                tpot=tpot,
                e2e=event.time - item.arrival,
                backend=item.backend,
            )
        )

    def deliver(now: float) -> int:
        """Advance every engine to `now` and feed the core their events; how many there were."""
        batch: list[tuple[float, int, FirstToken | Finished | Aborted]] = []
        for order, (bid, engine) in enumerate(engines.items()):
            for event in engine.advance(now):
                batch.append((event.time, order, event))
            if events_to is not None:
                apply_kv_events(events_to, bid, engine.take_kv_events(), now, tiers[bid])
        batch.sort(key=lambda item: (item[0], item[1]))
        for _, _, event in batch:
            if isinstance(event, FirstToken):
                if views is not None:
                    views.first_token(event.rid, live[event.rid].backend, event.time)
                    views.core_of(event.rid).on_first_token(
                        event.rid, event.time, event.cached_tokens
                    )
                    continue
                core.on_first_token(event.rid, event.time, event.cached_tokens)
            else:
                finish(event.rid, event)
        return len(batch)

    waits: list[float] = []
    shed_after: list[float] = []  # seconds from arrival to the shed answer
    tenants: dict[str, str] = {}

    def route_request(position: int, treq: TraceRequest) -> RouteRequest:
        rid = f"r{position}"
        if tenant_of is not None:
            tenants[rid] = tenant_of(treq)
        return route_request_from_hash_ids(
            rid,
            treq.hash_ids,
            trace.block_size,
            treq.input_length,
            treq.output_length,
            treq.session,
        )

    def dispatch(
        route_req: RouteRequest,
        decision: Decision,
        arrival: float,
        now: float,
        priority: int | None = None,
    ) -> None:
        if decision.predicted_ttft_s is not None:
            predicted[route_req.rid] = decision.predicted_ttft_s
        live[route_req.rid] = _Live(arrival=arrival, req=route_req, backend=decision.backend)
        output = route_req.max_tokens or 1
        sim = _sim_request(route_req, output_tokens=output, priority=priority)
        engines[decision.backend].add_request(sim, now)

    def shed(item: Shed, now: float) -> None:
        ticket = item.ticket
        shed_after.append(now - ticket.arrival)
        outcomes.append(
            RequestOutcome(
                rid=ticket.req.rid,
                arrival=ticket.arrival,
                prompt_tokens=ticket.req.prompt_tokens,
                output_tokens=0,
                cached_tokens=0,
                ttft=None,
                tpot=None,
                e2e=None,
                error=f"shed: {item.reason}",
            )
        )

    if config.scheduler is None:
        for position, treq in enumerate(trace.requests):
            now = treq.timestamp / config.load
            deliver(now)
            route_req = route_request(position, treq)
            if views is None:
                dispatch(route_req, core.route(route_req, now), now, now)
            else:
                views.apply_until(now)
                view = views.view_for(position)
                decision = views.cores[view].route(route_req, now)
                views.routed(view, decision.backend, route_req, now)
                dispatch(route_req, decision, now, now)
            waits.append(0.0)
            if on_request is not None:
                on_request()
    else:
        sched = Scheduler(core, config.scheduler)
        requests = trace.requests
        position = 0
        wake: float | None = None
        while True:
            next_arrival = (
                requests[position].timestamp / config.load if position < len(requests) else math.inf
            )
            t = min(next_arrival, math.inf if wake is None else wake)
            if len(sched):  # holding requests: react at every engine step boundary
                for engine in engines.values():
                    boundary = engine.next_event_time()
                    if boundary is not None and boundary < t:
                        t = boundary
            if t == math.inf:
                break
            events = deliver(t)
            # The router learns only from events (the live proxy steps on the same ones), so
            # a step boundary with none, no arrival and no wake-up changes nothing: skip it.
            woken = wake is not None and wake <= t
            if not events and not woken and t < next_arrival:
                continue
            while position < len(requests) and requests[position].timestamp / config.load <= t:
                treq = requests[position]
                ticket = Ticket(
                    req=route_request(position, treq),
                    arrival=t,
                    tenant=tenants.get(f"r{position}", ""),
                )
                refused = sched.submit(ticket, t)
                if refused is not None:
                    shed(refused, t)
                position += 1
                if on_request is not None:
                    on_request()
            out = sched.step(t)
            for bound in out.bound:
                dispatch(
                    bound.ticket.req, bound.decision, bound.ticket.arrival, t, bound.engine_priority
                )
                waits.append(bound.waited_s)
            for refused_later in out.shed:
                shed(refused_later, t)
            wake = out.wake_at

    while True:
        pending = [b for e in engines.values() if (b := e.next_event_time()) is not None]
        if not pending:
            break
        deliver(min(pending))
    for rid in list(live):  # an engine that went idle with requests still live lost them
        outcomes.append(_failed(rid, live.pop(rid), "lost by the engine"))

    outcomes.sort(key=lambda o: o.arrival)
    summary = summarize(outcomes, wall_s=time.perf_counter() - started)
    summary.update(_router_figures(outcomes, waits, shed_after, config.goodput_slo_s))
    if tenant_of is not None:
        groups: dict[str, list[RequestOutcome]] = {}
        for o in outcomes:
            groups.setdefault(tenants.get(o.rid, ""), []).append(o)
        summary["tenants"] = {
            name: {**summarize(group), **_router_figures(group, [], [], config.goodput_slo_s)}
            for name, group in sorted(groups.items())
        }
    return PolicyRun(
        policy=policy,
        outcomes=outcomes,
        summary=summary,
        stats=core.stats(),
        core=core,
        predicted_ttft=predicted,
    )


def _router_figures(
    outcomes: list[RequestOutcome], waits: list[float], shed_after: list[float], slo: float
) -> dict[str, Any]:
    """Goodput (requests meeting the TTFT SLO per second of arrivals), shed, router waits."""
    arrivals = [o.arrival for o in outcomes]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0
    good = sum(1 for o in outcomes if o.ttft is not None and o.ttft <= slo)
    ordered = sorted(waits)
    return {
        "goodput_slo_s": slo,
        "goodput_rps": good / span if span > 0 else 0.0,
        "goodput_share": good / len(outcomes) if outcomes else 0.0,
        "shed": sum(1 for o in outcomes if o.error is not None and o.error.startswith("shed")),
        "shed_answer_max_s": max(shed_after, default=0.0),
        "router_wait_p90": percentile(ordered, 90) if ordered else 0.0,
        "router_wait_mean": sum(ordered) / len(ordered) if ordered else 0.0,
    }


def _failed(rid: str, item: _Live, error: str) -> RequestOutcome:
    return RequestOutcome(
        rid=rid,
        arrival=item.arrival,
        prompt_tokens=item.req.prompt_tokens,
        output_tokens=0,
        cached_tokens=0,
        ttft=None,
        tpot=None,
        e2e=None,
        backend=item.backend,
        error=error,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityResult:
    slo_ttft_p90: float
    max_load: float
    probes: tuple[tuple[float, float], ...]  # (load, p90 TTFT) tried, in order


def capacity_p90(summary: Mapping[str, Any]) -> float:
    """What `find_capacity` wants of one run: its p90 TTFT, or +inf if any request failed."""
    return float("inf") if summary["failed"] else float(summary["ttft_p90"])


def find_capacity(
    run_at: Callable[[float], float],
    *,
    slo: float,
    start: float = 1.0,
    precision: float = 0.05,
    max_steps: int = 24,
) -> CapacityResult:
    """Highest load whose p90 TTFT (from `run_at(load)`) stays within `slo`, to `precision`.

    Brackets by doubling/halving from `start`, then bisects geometrically until hi/lo is within
    1 + precision. A load whose run had failures should make `run_at` return +inf (`capacity_p90`).
    """
    probes: list[tuple[float, float]] = []

    def ok(load: float) -> bool:
        p90 = run_at(load)
        probes.append((load, p90))
        return p90 <= slo

    lo, hi = 0.0, math.inf
    load = start
    for _ in range(max_steps):
        if ok(load):
            lo = load
            if hi < math.inf:
                break
            load *= 2
        else:
            hi = load
            if lo > 0:
                break
            load /= 2
            if load < 1e-3:
                break
    steps = 0
    while lo > 0 and hi < math.inf and hi / lo > 1 + precision and steps < max_steps:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
        steps += 1
    return CapacityResult(slo_ttft_p90=slo, max_load=lo, probes=tuple(probes))
