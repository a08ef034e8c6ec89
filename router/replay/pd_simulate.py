"""Virtual-time simulation of a PD-disaggregated pool: P prefill engines, D decode engines.

Each request's life, as SGLang's PD mode lives it (backends/sim/pd.py has the engines)::

    arrival      PDRouter.route -> (prefill p, decode d)
    room         d preallocates its KV (FCFS, prompt + output)  (SGLang: DecodePreallocQueue;
                 p holds the request in its bootstrap queue until then)
    prefill      engine p runs it with one output token        -> router.on_prefill_done
    transfer     p's link sends the prompt's KV (FIFO per link) -> arrives at d
    decode       engine d joins it to its batch: first token    -> router.on_first_token
                 ... the rest of the output                    -> router.on_finished

TTFT is arrival to the decode server's first token; TPOT is the decode server's mean gap.
The router learns only those events, as the live proxy would. Routers:

* `pair`: the paired price of router/core/pd.py (`cost` on prefill, `pd_decode` on decode);
* `<prefill policy>+<decode policy>`, e.g. `cache_aware+power_of_two` (SMG's PD defaults):
  each side chosen on its own by that policy.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.sim.api import Aborted, Finished, FirstToken, SimRequest
from backends.sim.engine import Engine, EngineConfig
from backends.sim.pd import (
    KVLink,
    PreallocQueue,
    decode_engine,
    decode_request,
    prefill_engine,
)
from backends.sim.perf import Profile, get_profile
from router.core.blocks import route_request_from_hash_ids
from router.core.model import BackendSpec, RouteRequest
from router.core.pd import PairConfig, PDDecision, PDRouter
from router.core.policies import make_policy
from router.core.routing import RoutingCore
from router.priors import prior_from_profile
from router.replay.metrics import RequestOutcome, percentile, summarize
from router.replay.simulate import _sim_request
from router.replay.traces import Trace

__all__ = [
    "PAIR",
    "PDRun",
    "PDSimConfig",
    "make_pd_router",
    "simulate_pd",
    "tpot_p90",
    "ttft_split",
]

PAIR = "pair"
# a benchmark target: `pair` under `--slo-tpot S` (PDSimConfig.tpot_slo_s)
PAIR_SLO_TPOT = "pair:slo-tpot="


def tpot_slo_of(target: str) -> float | None:
    """S of a `pair:slo-tpot=S` target name (None for any other name)."""
    return float(target.removeprefix(PAIR_SLO_TPOT)) if target.startswith(PAIR_SLO_TPOT) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PDSimConfig:
    """A PD pool: `prefill` + `decode` servers, all on `profile`."""

    prefill: int
    decode: int
    profile: str | Profile
    load: float = 1.0
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    link_bytes_per_s: float | None = None  # None: the profile's kv_link_bytes_per_s
    # `pair` holds requests in one queue while no decode server has KV room (router/core/pd.py)
    room_hold: bool = True
    # `pair`: the decode side's room ends where its learned step passes this (router/core/pd.py)
    tpot_slo_s: float | None = None

    def __post_init__(self) -> None:
        if self.prefill <= 0 or self.decode <= 0:
            raise ValueError("a PD pool needs at least one prefill and one decode server")
        if not self.load > 0:
            raise ValueError("load must be positive")
        if self.link_bytes_per_s is not None and not self.link_bytes_per_s > 0:
            raise ValueError("link_bytes_per_s must be positive")
        if self.tpot_slo_s is not None and not (self.tpot_slo_s > 0 and self.room_hold):
            raise ValueError("tpot_slo_s must be positive and needs room_hold")

    @property
    def resolved_profile(self) -> Profile:
        return self.profile if isinstance(self.profile, Profile) else get_profile(self.profile)

    @property
    def link(self) -> float:
        return self.link_bytes_per_s or self.resolved_profile.kv_link_bytes_per_s


@dataclass(slots=True, kw_only=True)
class PDRun:
    router: str
    outcomes: list[RequestOutcome]
    summary: dict[str, Any]
    stats: dict[str, Any]


def make_pd_router(
    router: str,
    prefill: list[BackendSpec],
    decode: list[BackendSpec],
    *,
    pair: PairConfig,
    seed: int = 0,
    room_hold: bool = False,
    tpot_slo_s: float | None = None,
) -> PDRouter:
    """`pair`, or `<prefill policy>+<decode policy>` (ValueError for anything else)."""
    if router == PAIR:
        pcore = RoutingCore(make_policy("cost", rng=random.Random(seed)), prefill)
        dcore = RoutingCore(make_policy("pd_decode", rng=random.Random(seed + 1)), decode)
        return PDRouter(pcore, dcore, pair=pair, room_hold=room_hold, tpot_slo_s=tpot_slo_s)
    names = router.split("+")
    if len(names) != 2 or not all(names):
        raise ValueError(f"PD router {router!r}: use 'pair' or '<prefill>+<decode>' policy names")
    pcore = RoutingCore(make_policy(names[0], rng=random.Random(seed)), prefill)
    dcore = RoutingCore(make_policy(names[1], rng=random.Random(seed + 1)), decode)
    return PDRouter(pcore, dcore, pair=None, hold_prefill=True)


def tpot_p90(outcomes: list[RequestOutcome]) -> float:
    """p90 of the completed requests' TPOT (NaN when none decoded past one token)."""
    return percentile(sorted(o.tpot for o in outcomes if o.tpot is not None), 90)


@dataclass(slots=True, kw_only=True)
class _Live:
    arrival: float
    prompt: int
    output: int
    prefill: str
    decode: str
    preallocated: float | None = None  # its decode server held KV room: the prefill may start
    prefill_done: float | None = None  # the prefill server's answer
    at_decode: float | None = None  # its KV landed at the decode server


Phases = tuple[float, float, float, float, float]
PHASES = ("ttft", "room_wait", "prefill", "transfer", "decode_wait")


def _unserved(
    rid: str, arrival: float, why: str, prompt_tokens: int = 0, backend: str = ""
) -> RequestOutcome:
    return RequestOutcome(
        rid=rid,
        arrival=arrival,
        prompt_tokens=prompt_tokens,
        output_tokens=0,
        cached_tokens=0,
        ttft=None,
        tpot=None,
        e2e=None,
        backend=backend,
        error=why,
    )


def ttft_split(phases: list[Phases]) -> dict[str, dict[str, float]]:
    """Where TTFT went: (ttft, room wait, prefill, transfer, decode wait) per request -> mean
    seconds of each phase over all requests and over the slowest tenth by TTFT (what sets the
    p90).

    room wait: arrival to the decode server's preallocation of its KV (its FCFS queue for
    room); prefill: from there to the prefill server's answer (its queue and compute);
    transfer: to the KV's arrival at the decode server; decode wait: to the first token there
    (one step, unless its batch is at its request cap).
    """
    if not phases:
        return {}
    ranked = sorted(phases)
    tail = ranked[int(0.9 * len(ranked)) :]
    names = PHASES

    def means(rows: list[Phases]) -> dict[str, float]:
        return {n: sum(r[i] for r in rows) / len(rows) for i, n in enumerate(names)}

    return {"mean": means(ranked), "slowest_10pct": means(tail)}


def simulate_pd(
    trace: Trace,
    router: str,
    config: PDSimConfig,
    *,
    on_request: Callable[[], None] | None = None,
    probe: Callable[[float, Mapping[str, Engine], Mapping[str, int]], None] | None = None,
) -> PDRun:
    """Run `trace` through a fresh PD pool routed by `router`; every request ends in an outcome.

    `probe(now, decode_engines, waiting_for_room)`, if given, is called at every arrival,
    before it is routed, to read (never change) the decode servers' state and how many
    requests wait for KV room on each (its own queue, plus those the router holds for the
    whole pool; benchmarks/pd_tpot.py).
    """
    started = time.perf_counter()
    profile = config.resolved_profile
    prior = prior_from_profile(profile)
    pids = [f"p{i}" for i in range(config.prefill)]
    dids = [f"d{i}" for i in range(config.decode)]
    pengines = {b: prefill_engine(profile, config.engine) for b in pids}
    dengines = {b: decode_engine(profile, config.engine) for b in dids}
    links = {b: KVLink(config.link, profile.kv_bytes_per_token()) for b in pids}
    rooms = {b: PreallocQueue(dengines[b]) for b in dids}

    def spec(bid: str, host: int) -> BackendSpec:
        return BackendSpec(
            id=bid,
            kv_capacity_tokens=profile.kv_capacity_tokens,
            host_cache_tokens=host,
            prior=prior,
            max_running_requests=config.engine.max_running_requests,
        )

    pd = make_pd_router(
        router,
        [spec(b, profile.host_capacity_tokens) for b in pids],
        [spec(b, 0) for b in dids],
        pair=PairConfig(
            kv_bytes_per_token=profile.kv_bytes_per_token(), link_bytes_per_s=config.link
        ),
        seed=config.seed,
        room_hold=config.room_hold,
        tpot_slo_s=config.tpot_slo_s if router == PAIR else None,
    )
    engines: dict[str, Engine] = {**pengines, **dengines}
    live: dict[str, _Live] = {}
    outcomes: list[RequestOutcome] = []
    transfers: list[tuple[float, int, str]] = []  # (arrival at decode, seq, rid)
    prefill_cached: dict[str, int] = {}  # rid -> what its prefill server had cached
    prompts: dict[str, SimRequest] = {}  # prefill requests waiting for their decode room
    arrivals: dict[str, float] = {}  # held in the router: rid -> arrival
    phases: list[Phases] = []  # for ttft_split
    seq = 0

    def fail(rid: str, now: float, why: str) -> None:
        item = live.pop(rid)
        rooms[item.decode].cancel(rid)
        prompts.pop(rid, None)
        pd.on_failed(rid, now)
        outcomes.append(
            _unserved(rid, item.arrival, why, item.prompt, f"{item.prefill}/{item.decode}")
        )

    def on_event(bid: str, event: FirstToken | Finished | Aborted) -> None:
        nonlocal seq
        rid = event.rid
        item = live.get(rid)
        if item is None:
            return
        if isinstance(event, Aborted):
            fail(rid, event.time, f"aborted by {bid}")
            return
        if bid in pengines:
            if isinstance(event, Finished):
                pd.on_prefill_done(rid, event.time, event.cached_tokens)
                item.prefill_done = event.time
                arrives = links[bid].send(item.prompt, event.time)
                heapq.heappush(transfers, (arrives, seq, rid))
                seq += 1
                prefill_cached[rid] = event.cached_tokens
            return
        if isinstance(event, FirstToken):
            pd.on_first_token(rid, event.time)
            return
        live.pop(rid)
        cached = prefill_cached.pop(rid, 0)
        pd.on_finished(rid, event.time, event.output_tokens)
        ttft = event.first_token_time - item.arrival
        held, answered, landed = item.preallocated, item.prefill_done, item.at_decode
        if held is not None and answered is not None and landed is not None:
            phases.append((ttft, held - item.arrival, answered - held, landed - answered,
                           event.first_token_time - landed))  # fmt: skip
        tpot = (
            (event.time - event.first_token_time) / (event.output_tokens - 1)
            if event.output_tokens > 1
            else None
        )
        outcomes.append(
            RequestOutcome(
                rid=rid,
                arrival=item.arrival,
                prompt_tokens=item.prompt,
                output_tokens=event.output_tokens,
                cached_tokens=cached,
                ttft=ttft,
                tpot=tpot,
                e2e=event.time - item.arrival,
                backend=f"{item.prefill}/{item.decode}",
            )
        )

    def deliver(now: float) -> None:
        batch: list[tuple[float, int, str, FirstToken | Finished | Aborted]] = []
        for order, (bid, engine) in enumerate(engines.items()):
            for event in engine.advance(now):
                batch.append((event.time, order, bid, event))
        batch.sort(key=lambda item: (item[0], item[1]))
        for _, _, bid, event in batch:
            on_event(bid, event)
        for req, decision in pd.release(now):
            send(req, decision, arrivals.pop(req.rid), now)
        for rooms_at in rooms.values():
            if rooms_at:
                start_prefills(rooms_at.pump(now), now)
        while transfers and transfers[0][0] <= now:
            arrived, _, rid = heapq.heappop(transfers)
            item = live.get(rid)
            if item is not None:
                item.at_decode = arrived
                engines[item.decode].add_request(decode_request(rid, item.prompt, item.output), now)

    def send(req: RouteRequest, decision: PDDecision, arrival: float, now: float) -> None:
        """To both servers: the decode server queues it for KV room first."""
        rid = req.rid
        output = max(req.max_tokens or 1, 1)
        live[rid] = _Live(
            arrival=arrival,
            prompt=req.prompt_tokens,
            output=output,
            prefill=decision.prefill.backend,
            decode=decision.decode.backend,
        )
        room = rooms[decision.decode.backend]
        if room.offer(rid, req.prompt_tokens, output):
            prompts[rid] = _sim_request(req, output_tokens=1)
            start_prefills(room.pump(now), now)
        else:
            fail(rid, now, f"too large for {decision.decode.backend}")

    def start_prefills(rids: list[str], now: float) -> None:
        """Their decode room is held: the prefill servers' bootstrap queues let them in."""
        for rid in rids:
            item = live[rid]
            item.preallocated = now
            pengines[item.prefill].add_request(prompts.pop(rid), now)

    def run_until(t: float) -> None:
        """Every engine step and transfer up to `t`, in time order."""
        while True:
            nxt = min(
                (b for e in engines.values() if (b := e.next_event_time()) is not None),
                default=float("inf"),
            )
            if transfers:
                nxt = min(nxt, transfers[0][0])
            if nxt > t:
                break
            deliver(nxt)
        deliver(t)

    for position, treq in enumerate(trace.requests):
        now = treq.timestamp / config.load
        run_until(now)
        if probe is not None:
            probe(now, dengines, {b: len(q) + pd.held for b, q in rooms.items()})
        rid = f"r{position}"
        req = route_request_from_hash_ids(
            rid, treq.hash_ids, trace.block_size, treq.input_length, treq.output_length
        )
        decision = pd.submit(req, now)
        if decision is None:
            arrivals[rid] = now  # held in the router for decode room
        else:
            send(req, decision, now, now)
        if on_request is not None:
            on_request()
    while True:
        pending = [b for e in engines.values() if (b := e.next_event_time()) is not None]
        if transfers:
            pending.append(transfers[0][0])
        if not pending:
            break
        deliver(min(pending))
    end = max(e.now for e in engines.values())
    for rid in list(live):
        fail(rid, end, "lost by the engine")
    for rid, arrival in arrivals.items():  # held for room no decode server ever had
        pd.on_failed(rid, end)
        outcomes.append(_unserved(rid, arrival, "held for decode room to the end"))

    outcomes.sort(key=lambda o: o.arrival)
    summary = summarize(outcomes, wall_s=time.perf_counter() - started)
    summary["tpot_p90"] = tpot_p90(outcomes)
    summary["ttft_split"] = ttft_split(phases)
    summary["prefill_servers"] = config.prefill
    summary["decode_servers"] = config.decode
    return PDRun(router=router, outcomes=outcomes, summary=summary, stats=pd.stats())
