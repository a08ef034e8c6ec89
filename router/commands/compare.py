"""`prefix-router compare`: one trace window through our router and sglang-router, live.

For each target: N fresh simulated backends, that router in front, the window replayed over
HTTP, everything stopped (`router.replay.compare`). Prints one table; writes the DESIGN
section 7 JSON with `results` keyed by target name and a TTFT CDF of all targets. Children
are stopped on success, error, Ctrl-C and SIGTERM alike.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "compare routers live: ours, SMG and sglang-router, each in front of fresh simulated pools"
DESCRIPTION = """\
Starts N simulated SGLang backends and one router per target, replays the same trace window
over HTTP through each, and prints one table (TTFT, TPOT, E2E, hit ratio, failures). The JSON
also keeps what our router learned (its /stats per target); --outcomes keeps every request.

Targets: our policies by name (cost, cache_aware, round_robin, ...), SMG 1.13 (the Shepherd
Model Gateway, what SGLang users run now) as smg:cache_aware, smg:least_load, smg:prefix_hash,
smg:power_of_two, ..., and sglang-router 0.3.2 as sglang-router:cache_aware, ... (the bench
extra installs both). A "+queue" suffix turns on
the router's own admission: ours as `serve --scheduler on --slo-ttft S` (`+queue=H` or
`+queue=off` adds `--scheduler-headroom H|off`), SMG with
`--max-concurrent-requests 32xN --queue-size 100 --queue-timeout-secs S` (S: --slo-ttft-p90
when given in seconds, else 2); a 429 counts as a failed request.
Ours runs as one process; POLICY@N (cost@2) runs it as `serve --workers N`.

example (about 2 minutes per target):
  prefix-router compare --trace conversation --backends 4 --profile llama3-8b-h100-hicache \\
      --start 600 --duration 120 --load 1 \\
      --targets cost,round_robin,sglang-router:cache_aware,sglang-router:round_robin \\
      --json compare.json --plot compare.png

--speedup F runs the simulated GPUs F times faster than the wall clock and scales times back
(keep F <= 4: router overhead weighs F times more).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--trace", required=True, help="trace path or bundled name")
    a("--backends", type=int, default=4, help="simulated backends per target (default 4)")
    a("--profile", default="llama3-8b-h100", help="performance profile of the backends")
    a("--start", type=float, default=0.0, help="window start, seconds of trace")
    a("--duration", type=float, default=120.0, help="window length, seconds (default 120)")
    a("--load", type=float, default=1.0, help="arrival-rate multiplier (timestamps / load)")
    a(
        "--targets",
        default="cost,round_robin,sglang-router:cache_aware,sglang-router:round_robin",
        help="comma-separated targets (default: all four)",
    )
    a(
        "--slo-ttft-p90",
        default=None,
        metavar="S|auto",
        help="report each target's p90 TTFT against this SLO: seconds, or 'auto' = 2 x "
        "round_robin's simulated p90 on an idle pool of this window (router.replay.slo)",
    )
    a("--api", choices=["chat", "completions", "generate"], default="completions")
    a("--speedup", type=float, default=1.0, help="simulated time runs this many times faster")
    a(
        "--stream-interval",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="wall-clock seconds between a stream's chunks at the simulated backends (default "
        "0.02, theirs); a longer one leaves a small box's CPU to the routers, for every target",
    )
    a("--log-dir", type=Path, default=None, help="keep child process logs here")
    a("--json", type=Path, default=None, help="write results JSON here")
    a("--plot", type=Path, default=None, help="write a TTFT CDF PNG here")
    a(
        "--outcomes",
        type=Path,
        default=None,
        help="write every request's outcome per target here (JSON; rid, TTFT, backend, ...)",
    )
    a("--quiet", action="store_true", help="no progress bars")


def _fail(message: str) -> int:
    return usage_error("compare", message)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through run_target's finally, which stops the children


def run(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from backends.sim.perf import PROFILES
    from router.core.policies import POLICIES
    from router.replay.client import check_trace_api, run_summary
    from router.replay.compare import CompareConfig, ProcessSet, Target, parse_targets, run_compare
    from router.replay.metrics import RequestOutcome, write_json
    from router.replay.report import format_table, plot_ttft_cdf
    from router.replay.simulate import SimConfig
    from router.replay.slo import auto_slo, parse_slo
    from router.replay.traces import load_window

    slo_given: float | None = None
    if args.slo_ttft_p90 is not None:
        try:
            slo_given = parse_slo(args.slo_ttft_p90)
        except ValueError as exc:
            return _fail(str(exc))
    if args.profile not in PROFILES:
        return _fail(f"unknown profile {args.profile!r}; known: {', '.join(PROFILES)}")
    if args.start < 0 or not args.duration > 0:
        return _fail("--start must be >= 0 and --duration positive")
    try:
        targets = parse_targets(args.targets, sorted(POLICIES))
        config = CompareConfig(
            backends=args.backends,
            profile=args.profile,
            load=args.load,
            speedup=args.speedup,
            stream_interval_s=args.stream_interval,
            queue_deadline_s=slo_given if slo_given is not None else 2.0,
            api=args.api,
        )
    except ValueError as exc:
        return _fail(str(exc))
    try:
        trace = load_window(args.trace, args.start, args.duration)
        check_trace_api(trace, args.api)
    except ValueError as exc:  # TraceError is one
        return _fail(str(exc))

    slo: float | None = slo_given
    if args.slo_ttft_p90 is not None and slo is None:
        slo = auto_slo(trace, SimConfig(profiles=(args.profile,) * args.backends))
        print(f"--slo-ttft-p90 auto: {slo:g} s (2 x round_robin's idle p90)", file=sys.stderr)

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="prefix-router-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(log_dir)
    print(
        f"comparing {len(targets)} targets on {len(trace.requests)} requests of {trace.name} "
        f"({args.backends} x {args.profile}, load {args.load:g}, speedup {args.speedup:g}); "
        f"logs in {log_dir}",
        file=sys.stderr,
    )
    bars: list[Any] = []

    def on_target(target: Target) -> Any:
        bar = tqdm(total=len(trace.requests), unit="req", desc=target.name, disable=args.quiet)
        bars.append(bar)

        def done(_o: RequestOutcome) -> None:
            bar.update()

        return done

    previous = signal.signal(signal.SIGTERM, _sigterm)
    started = time.perf_counter()
    try:
        runs = asyncio.run(run_compare(trace, targets, config, procs, on_target=on_target))
    except KeyboardInterrupt:
        print("prefix-router compare: interrupted; children stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # startup failures and the like: one clear line, children stopped
        print(f"prefix-router compare: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        for bar in bars:
            bar.close()
    total_s = time.perf_counter() - started

    results = {name: run_summary(r) for name, r in runs.items()}
    title = (
        f"{trace.name} [{args.start:g}s +{args.duration:g}s]: {args.backends} x {args.profile}, "
        f"load {args.load:g}, live HTTP"
        + (f", speedup {args.speedup:g}" if args.speedup != 1 else "")
    )
    print(format_table(results, title=title))
    if slo is not None:
        for res in results.values():
            res["slo_ttft_p90"] = slo
            res["meets_slo"] = bool(res["ttft_p90"] <= slo and res["failed"] == 0)
        met = [n for n, r in results.items() if r["meets_slo"]]
        print(f"p90 TTFT <= {slo:g} s ({'auto' if slo_given is None else 'given'}): "
              f"{', '.join(met) or 'none'}")  # fmt: skip
    print(f"total wall time {total_s:.0f} s", file=sys.stderr)
    if args.json is not None:
        doc = {
            "trace": trace.name,
            "backends": args.backends,
            "profile": args.profile,
            "load": args.load,
            "start": args.start,
            "duration": args.duration,
            "speedup": args.speedup,
            "stream_interval_s": args.stream_interval,
            "api": args.api,
            "requests": len(trace.requests),
            "slo_ttft_p90": slo,
            "slo_source": None if slo is None else ("given" if slo_given else "auto"),
            "total_wall_s": total_s,
            "results": results,
            "router_stats": {
                n: r.extra["router_stats"] for n, r in runs.items() if "router_stats" in r.extra
            },
            "ttft_split": {
                n: r.extra["ttft_split"] for n, r in runs.items() if "ttft_split" in r.extra
            },
        }
        write_json(args.json, doc)
    if args.outcomes is not None:
        per_request = {n: [asdict(o) for o in r.outcomes] for n, r in runs.items()}
        write_json(args.outcomes, per_request, indent=None)
    if args.plot is not None:
        plot_ttft_cdf({n: r.outcomes for n, r in runs.items()}, args.plot, title=title)
    return 0
