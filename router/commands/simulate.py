"""`prefix-router simulate`: a whole pool in virtual time, one run per policy."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from router.commands import usage_error
from router.commands._scheduler_args import HEADROOM_HELP, headroom_arg

HELP = "simulate a pool of SGLang backends in virtual time and compare routing policies"
DESCRIPTION = """\
Replays a trace against N simulated SGLang engines in virtual time (an hour of trace takes
seconds), once per policy, each on fresh engines with empty caches, and reports TTFT, TPOT, E2E
and prefix-cache hit ratio per policy beside two bounds: the ideal hit ratio (one infinite
cache) and the LRU bound (one LRU cache holding the whole pool's KV capacity).

examples:
  prefix-router simulate --trace conversation --backends 8 --profile llama3-8b-h100 \\
      --policies round_robin,cache_aware,cost --json out.json --plot out.png
  prefix-router simulate --trace my.jsonl --backends 8 --find-capacity --slo-ttft-p90 2
  prefix-router simulate --trace conversation --policies cost --scheduler on --slo-ttft 2

--scheduler on holds requests in the router and binds them late (router/core/scheduler.py);
with --slo-ttft it also sheds, on arrival, requests predicted to miss that TTFT. Each policy's
result gains goodput_rps (requests with TTFT within --slo-ttft, or --slo-ttft-p90, per second),
shed (count; a capacity search counts a shed request as a failed one) and router_wait_p90.

--pd 4:4 simulates 4 prefill + 4 decode servers (SGLang's PD disaggregation: KV moved over a
--link-gbps link) and compares PD routers: 'pair' and '<prefill>+<decode>' policy pairs.

--trace takes a path (Mooncake JSONL, Azure CSV, chat-log JSONL) or a bundled name:
conversation, azure-conv, azure-code, mtbench-chat.
"""

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

_DEFAULT_POLICIES = "round_robin,cache_aware,cost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace path or bundled name")
    parser.add_argument("--backends", type=int, default=8, help="pool size (default 8)")
    parser.add_argument(
        "--profile",
        default="llama3-8b-h100",
        help="performance profile; a comma list is cycled over the backends for a mixed pool "
        "(see `prefix-router profiles`)",
    )
    parser.add_argument(
        "--load", type=float, default=1.0, help="arrival-rate multiplier (timestamps / load)"
    )
    parser.add_argument(
        "--policies",
        default=_DEFAULT_POLICIES,
        help="comma-separated policies to run (default: round_robin,cache_aware,cost)",
    )
    parser.add_argument("--start", type=float, default=0.0, help="window start, seconds of trace")
    parser.add_argument("--duration", type=float, default=None, help="window length, seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed for randomized policies")
    parser.add_argument(
        "--schedule-policy", choices=["fcfs", "lpm"], default="fcfs", help="engine queue order"
    )
    parser.add_argument(
        "--find-capacity", action="store_true", help="search each policy's capacity"
    )
    parser.add_argument(
        "--slo-ttft-p90",
        default="2",
        help="p90 TTFT SLO for --find-capacity: seconds, or 'auto' = 2 x round_robin's p90 "
        "on an idle pool (this window at load 0.05; router.replay.slo), for traces whose "
        "long prompts miss any fixed SLO (default 2)",
    )
    parser.add_argument(
        "--capacity-precision",
        type=float,
        default=0.05,
        help="stop the capacity search when hi/lo <= 1 + this (default 0.05)",
    )
    parser.add_argument(
        "--kv-events",
        action="store_true",
        help="the engines publish KV events and the router's index follows them (as serve "
        "does with SGLang's) instead of modelling each cache",
    )
    parser.add_argument(
        "--scheduler",
        choices=["on", "off"],
        default="off",
        help="hold requests in the router and bind them late (default off)",
    )
    parser.add_argument(
        "--scheduler-budget",
        type=float,
        default=None,
        metavar="S",
        help="predicted prefill seconds a backend may have queued before the router holds "
        "the rest (default 0.5)",
    )
    parser.add_argument(
        "--slo-ttft",
        type=float,
        default=None,
        metavar="S",
        help="with --scheduler on: shed on arrival requests predicted to miss this TTFT",
    )
    parser.add_argument(
        "--scheduler-headroom", type=headroom_arg, default=None, metavar="H|off", help=HEADROOM_HELP
    )
    parser.add_argument(
        "--pd",
        default=None,
        metavar="P:D",
        help="a PD-disaggregated pool of P prefill and D decode servers instead of --backends; "
        "--policies then names PD routers: 'pair' (ours, the paired price) or "
        "'<prefill>+<decode>' policies chosen independently (default pair,"
        "cache_aware+power_of_two)",
    )
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        metavar="GB/S",
        help="with --pd: KV transfer link per server, GB/s (default: the profile's, 40)",
    )
    parser.add_argument(
        "--slo-tpot",
        type=float,
        default=None,
        metavar="S",
        help="with --pd, router 'pair': fill no decode server past the KV at which its learned "
        "decode step reaches S seconds (requests wait in the router instead; docs/pd.md)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a TTFT CDF PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fail(message: str) -> int:
    return usage_error("simulate", message)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backends.sim.engine import EngineConfig
    from backends.sim.perf import PROFILES
    from router.core.policies import POLICIES
    from router.core.scheduler import SchedulerConfig, headroom_knobs
    from router.replay.analyze import ideal_hit_ratio, lru_hit_ratio
    from router.replay.metrics import write_json
    from router.replay.report import format_table, plot_ttft_cdf
    from router.replay.simulate import SimConfig, capacity_p90, find_capacity, simulate_policy
    from router.replay.slo import auto_slo, parse_slo
    from router.replay.traces import TraceError, load_window

    if args.backends < 1:
        return _fail("--backends must be at least 1")
    if not (args.load > 0 and math.isfinite(args.load)):
        return _fail(f"--load must be a positive number, got {args.load:g}")
    if not (args.start >= 0 and math.isfinite(args.start)):
        return _fail(f"--start must be non-negative, got {args.start:g}")
    if args.duration is not None and not (args.duration > 0):
        return _fail(f"--duration must be positive, got {args.duration:g}")
    try:
        slo = parse_slo(args.slo_ttft_p90)
    except ValueError:
        return _fail(f"--slo-ttft-p90 must be a positive number or 'auto', got {args.slo_ttft_p90}")
    if not 0 < args.capacity_precision < 1:
        return _fail(f"--capacity-precision must be in (0, 1), got {args.capacity_precision:g}")
    for flag, value in (
        ("--scheduler-budget", args.scheduler_budget),
        ("--slo-ttft", args.slo_ttft),
    ):
        if value is not None and not (value > 0 and math.isfinite(value)):
            return _fail(f"{flag} must be a positive number, got {value:g}")
    if args.scheduler == "off" and (
        args.slo_ttft is not None or args.scheduler_budget or args.scheduler_headroom is not None
    ):
        return _fail("--slo-ttft, --scheduler-budget and --scheduler-headroom need --scheduler on")
    if args.link_gbps is not None and not (args.link_gbps > 0 and math.isfinite(args.link_gbps)):
        return _fail(f"--link-gbps must be a positive number, got {args.link_gbps:g}")
    if args.slo_tpot is not None and not (args.slo_tpot > 0 and math.isfinite(args.slo_tpot)):
        return _fail(f"--slo-tpot must be a positive number of seconds, got {args.slo_tpot:g}")
    if args.slo_tpot is not None and args.pd is None:
        return _fail("--slo-tpot applies to PD pools: give --pd P:D")
    if args.pd is not None:
        from router.commands._simulate_pd import DEFAULT_PD_ROUTERS, run_pd

        if args.profile not in PROFILES:
            return _fail(f"unknown profile {args.profile!r}; known: {', '.join(PROFILES)}")
        if args.scheduler == "on" or args.kv_events:
            return _fail("--pd runs without --scheduler and --kv-events")
        given = args.policies if args.policies != _DEFAULT_POLICIES else DEFAULT_PD_ROUTERS
        return run_pd(args, [p.strip() for p in given.split(",") if p.strip()])
    names = [p.strip() for p in args.profile.split(",") if p.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if not names or unknown:
        shown = ", ".join(unknown) if unknown else repr(args.profile)
        return _fail(f"unknown profile {shown}; known: {', '.join(PROFILES)}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if not policies or bad:
        shown = f"unknown policy {', '.join(bad)}" if bad else "--policies names no policy"
        return _fail(f"{shown}; known: {', '.join(sorted(POLICIES))}")
    try:
        trace = load_window(args.trace, args.start, args.duration)
    except TraceError as exc:
        return _fail(str(exc))

    profiles = tuple(names[i % len(names)] for i in range(args.backends))
    engine_cfg = EngineConfig(schedule_policy=args.schedule_policy)
    pool_tokens = sum(PROFILES[p].kv_capacity_tokens for p in profiles)
    ideal = ideal_hit_ratio(trace)
    lru = lru_hit_ratio(trace, pool_tokens)
    print(
        f"trace {trace.name}: {len(trace.requests)} requests over {trace.duration():.0f} s; "
        f"{args.backends} x {args.profile}; ideal hit ratio {ideal:.3f}, "
        f"LRU bound at pool capacity ({pool_tokens:,} tokens) {lru:.3f}",
        file=sys.stderr,
    )

    if slo is None:  # --slo-ttft-p90 auto: the SLO the capacity search and goodput use
        slo = auto_slo(trace, SimConfig(profiles=profiles, seed=args.seed, engine=engine_cfg))
        print(f"--slo-ttft-p90 auto: {slo:g} s (2 x round_robin's idle p90)", file=sys.stderr)

    scheduler = None
    if args.scheduler == "on":
        # Order by the TTFT the run is judged by (requests already past it go last).
        knobs: dict[str, Any] = {"slo_ttft_s": args.slo_ttft, "late_last_s": slo}
        if args.scheduler_budget is not None:
            knobs["budget_s"] = args.scheduler_budget
        if args.scheduler_headroom is not None:
            knobs.update(headroom_knobs(args.scheduler_headroom))
        scheduler = SchedulerConfig(**knobs)
    goodput_slo = args.slo_ttft if args.slo_ttft is not None else slo

    def one_run(policy: str, load: float, desc: str) -> Any:
        cfg = SimConfig(
            profiles=profiles,
            load=load,
            seed=args.seed,
            engine=engine_cfg,
            kv_events=args.kv_events,
            scheduler=scheduler,
            goodput_slo_s=goodput_slo,
        )
        with tqdm(
            total=len(trace.requests), desc=desc, unit="req", disable=args.quiet, leave=False
        ) as bar:
            return simulate_policy(trace, policy, cfg, on_request=bar.update)

    results: dict[str, Any] = {}
    outcomes: dict[str, Any] = {}
    for policy in policies:
        outcome = one_run(policy, args.load, f"{policy} @ load {args.load:g}")
        summary = dict(outcome.summary)
        summary["ideal_hit_ratio"] = ideal
        summary["lru_bound_hit_ratio"] = lru
        results[policy] = summary
        outcomes[policy] = outcome.outcomes

    capacity: dict[str, Any] = {}
    if args.find_capacity:
        for policy in policies:

            def p90_at(load: float, policy: str = policy) -> float:
                summary = one_run(policy, load, f"{policy} capacity @ {load:.3g}").summary
                return capacity_p90(summary)

            found = find_capacity(
                p90_at, slo=slo, start=args.load, precision=args.capacity_precision
            )
            capacity[policy] = {
                "slo_ttft_p90": found.slo_ttft_p90,
                "slo_source": "auto" if parse_slo(args.slo_ttft_p90) is None else "given",
                "max_load": found.max_load,
                "probes": [list(p) for p in found.probes],
            }
            print(f"capacity {policy}: load {found.max_load:.3f}", file=sys.stderr)

    title = (
        f"{trace.name}: {args.backends} x {args.profile}, load {args.load:g} "
        f"(ideal hit {ideal:.3f}, LRU bound {lru:.3f})"
    )
    print(format_table(results, title=title))
    for policy, res in results.items():
        print(
            f"  {policy}: goodput {res['goodput_rps']:.2f} req/s within "
            f"{res['goodput_slo_s']:g} s, shed {res['shed']}, "
            f"router wait p90 {res['router_wait_p90']:.3f} s"
        )
    if capacity:
        for policy, cap in capacity.items():
            slo, load = cap["slo_ttft_p90"], cap["max_load"]
            print(f"  capacity at p90 TTFT <= {slo:g} s: {policy} {load:.3f}")

    if args.json is not None:
        headroom: float | str | None = None  # throughput admission, with deadline admission
        if scheduler is not None and scheduler.slo_ttft_s is not None:
            headroom = scheduler.throughput_headroom if scheduler.throughput_admission else "off"
        doc: dict[str, Any] = {
            "trace": trace.name,
            "backends": args.backends,
            "profile": args.profile,
            "load": args.load,
            "start": args.start,
            "duration": args.duration,
            "pool_kv_tokens": pool_tokens,
            "scheduler": args.scheduler,
            "slo_ttft": args.slo_ttft,
            "scheduler_headroom": headroom,
            "results": results,
        }
        if capacity:
            doc["capacity"] = capacity
        write_json(args.json, doc)
    if args.plot is not None:
        plot_ttft_cdf(outcomes, args.plot, title=title)
    return 0
