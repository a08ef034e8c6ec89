"""`prefix-router plan`: how many backends each policy needs for the SLOs, from a trace."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "plan a pool from a trace (e.g. your own, from serve --record): backends per policy"
DESCRIPTION = """\
For each policy, the smallest number of backends whose simulated p90 TTFT (and p90 TPOT with
--slo-tpot-p90) meets the SLO with no failed request, at the trace's arrival rate x each
--growth factor; beside it the pool one backend smaller (which misses), the hit ratio and its
bounds (ideal: one infinite cache; LRU: one cache of the pool's total KV). Virtual time, the
same engine and policies as `simulate`.

--check instead simulates a recording (serve --record) on the pool size and policy it was
recorded on, and sets the simulated TTFT distribution beside the TTFTs the router measured
live: how far to trust the plan on this traffic.

examples:
  prefix-router plan --trace rec.jsonl --profile llama3-8b-h100 --slo-ttft-p90 1 \\
      --growth 1,1.5,2 --json plan.json --plot plan.png
  prefix-router plan --trace rec.jsonl --profile llama3-8b-h100 --host-cache --slo-ttft-p90 1
  prefix-router plan --trace rec.jsonl --profile llama3-8b-h100 --check --plot check.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--trace", required=True, help="trace path (a recording) or bundled name")
    a(
        "--profile",
        default="llama3-8b-h100",
        help="every backend's profile (prefix-router profiles)",
    )
    a("--host-cache", action="store_true", help="give each backend a HiCache host tier (4x KV)")
    a("--slo-ttft-p90", type=float, default=1.0, help="p90 TTFT target, seconds (default 1)")
    a("--slo-tpot-p90", type=float, default=None, help="p90 TPOT target, seconds (optional)")
    a("--growth", default="1,1.5,2", help="load factors to plan for (default 1,1.5,2)")
    a("--policies", default="round_robin,cache_aware,cost", help="comma-separated policies")
    a("--max-backends", type=int, default=256, help="largest pool tried (default 256)")
    a("--start", type=float, default=0.0, help="window start, seconds of trace")
    a("--duration", type=float, default=None, help="window length, seconds")
    a("--check", action="store_true", help="simulate the recorded pool beside the live TTFTs")
    a("--seed", type=int, default=0, help="seed for randomized policies")
    a("--json", type=Path, default=None, help="write the plan (or check) JSON here")
    a("--plot", type=Path, default=None, help="write the plot (PNG) here")
    a("--quiet", action="store_true", help="no progress lines")


def _fail(message: str) -> int:
    return usage_error("plan", message)


def run(args: argparse.Namespace) -> int:
    from backends.sim.perf import PROFILES
    from router.core.policies import POLICIES
    from router.replay.metrics import write_json
    from router.replay.plan import PlanConfig, Probe, format_plan, plan, plot_plan, with_host_cache
    from router.replay.traces import load_window

    if args.profile not in PROFILES:
        return _fail(f"unknown profile {args.profile}; known: {', '.join(PROFILES)}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if not policies or bad:
        return _fail(f"unknown policy {', '.join(bad) or '(none)'}; known: {', '.join(POLICIES)}")
    try:
        growths = [float(g) for g in args.growth.split(",") if g.strip()]
    except ValueError:
        return _fail(f"--growth must be comma-separated numbers, got {args.growth!r}")
    if not growths or not all(g > 0 and math.isfinite(g) for g in growths):
        return _fail("--growth factors must be positive numbers")
    profile = PROFILES[args.profile]
    if args.host_cache:
        profile = with_host_cache(profile)
    try:
        cfg = PlanConfig(
            profile=profile,
            slo_ttft_p90=args.slo_ttft_p90,
            slo_tpot_p90=args.slo_tpot_p90,
            max_backends=args.max_backends,
            seed=args.seed,
        )
        trace = load_window(args.trace, args.start, args.duration)
    except ValueError as exc:  # TraceError is one
        return _fail(str(exc))
    if args.check:
        return _check(args, trace, cfg, policies)

    def progress(policy: str, growth: float, probe: Probe) -> None:
        if not args.quiet:
            verdict = "meets" if probe.meets else "misses"
            print(
                f"  {policy} @ {growth:g}x: {probe.backends} backends, p90 TTFT "
                f"{probe.ttft_p90:.3f} s, {probe.failed} failed -> {verdict}",
                file=sys.stderr,
            )

    doc = plan(trace, policies, growths, cfg, on_probe=progress)
    print(format_plan(doc))
    if args.json is not None:
        write_json(args.json, doc)
    if args.plot is not None:
        plot_plan(doc, args.plot)
    return 0


def _check(args: argparse.Namespace, trace: Any, cfg: Any, policies: list[str]) -> int:
    from router.replay.metrics import RequestOutcome, write_json
    from router.replay.plan import check
    from router.replay.recording import live_view
    from router.replay.report import plot_ttft_cdf

    path = Path(args.trace)
    if not path.is_file():
        return _fail("--check needs a recorded file (serve --record), not a bundled trace")
    live = live_view(path)
    if not live.ttfts or live.backends == 0:
        return _fail(f"{path} holds no live TTFTs (record streaming requests with serve --record)")
    policy = live.policy or policies[0]
    doc, outcomes = check(trace, live, policy, live.backends, cfg)
    sim, real = doc["ttft_simulated"], doc["ttft_live"]
    print(
        f"{trace.name}: {doc['requests']} requests on {live.backends} x {cfg.profile.name}, "
        f"policy {policy}\n"
        f"  TTFT      mean     p50      p90      p99\n"
        f"  simulated {sim['mean']:.3f}  {sim['p50']:.3f}  {sim['p90']:.3f}  {sim['p99']:.3f}\n"
        f"  live      {real['mean']:.3f}  {real['p50']:.3f}  {real['p90']:.3f}  {real['p99']:.3f}\n"
        f"  simulated / live mean: {doc['mean_ratio_simulated_over_live']:.3f}"
    )
    if args.json is not None:
        write_json(args.json, doc)
    if args.plot is not None:
        measured = [
            RequestOutcome(
                rid=str(i),
                arrival=0.0,
                prompt_tokens=0,
                output_tokens=1,
                cached_tokens=0,
                ttft=t,
                tpot=None,
                e2e=t,
            )
            for i, t in enumerate(live.ttfts)
        ]
        title = f"{trace.name}: simulated vs live TTFT ({live.backends} x {policy})"
        plot_ttft_cdf({"live (recorded)": measured, "simulated": outcomes}, args.plot, title=title)
    return 0
