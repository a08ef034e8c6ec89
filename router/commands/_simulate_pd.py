"""`prefix-router simulate --pd P:D`: a prefill-decode disaggregated pool in virtual time.

Kept apart from `simulate.py` (the mixed pool) because its pool, routers and figures differ:
P prefill plus D decode servers, routers named `pair` or `<prefill>+<decode>` (router/replay/
pd_simulate.py), and p90 TPOT beside p90 TTFT, since separating decode from prefill is what
PD buys.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from router.commands import usage_error

__all__ = ["DEFAULT_PD_ROUTERS", "parse_pd", "run_pd"]

DEFAULT_PD_ROUTERS = "pair,cache_aware+power_of_two"


def parse_pd(text: str) -> tuple[int, int]:
    """'4:4' -> (4, 4); ValueError for anything else."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(text)
    p, d = int(parts[0]), int(parts[1])
    if p < 1 or d < 1:
        raise ValueError(text)
    return p, d


def run_pd(args: argparse.Namespace, routers: list[str]) -> int:
    """The `simulate` run for a PD pool (arguments already checked by `simulate.run`)."""
    from tqdm import tqdm

    from backends.sim.engine import EngineConfig
    from router.core.policies import POLICIES
    from router.replay.metrics import write_json
    from router.replay.pd_simulate import PAIR, PDSimConfig, simulate_pd
    from router.replay.report import format_table
    from router.replay.simulate import capacity_p90, find_capacity
    from router.replay.slo import parse_slo
    from router.replay.traces import TraceError, load_window

    def fail(message: str) -> int:
        return usage_error("simulate", message)

    try:
        prefill, decode = parse_pd(args.pd)
    except ValueError:
        return fail(f"--pd takes PREFILL:DECODE server counts such as 4:4, got {args.pd!r}")
    for router in routers:
        names = router.split("+")
        if router != PAIR and (len(names) != 2 or any(n not in POLICIES for n in names)):
            return fail(
                f"PD router {router!r}: use 'pair' or '<prefill policy>+<decode policy>' "
                f"with known policies ({', '.join(sorted(POLICIES))})"
            )
    slo = parse_slo(args.slo_ttft_p90)
    if slo is None:
        return fail("--slo-ttft-p90 auto is not supported with --pd; give seconds")
    try:
        trace = load_window(args.trace, args.start, args.duration)
    except TraceError as exc:
        return fail(str(exc))
    engine_cfg = EngineConfig(schedule_policy=args.schedule_policy)

    def one_run(router: str, load: float, desc: str) -> Any:
        cfg = PDSimConfig(
            prefill=prefill,
            decode=decode,
            profile=args.profile,
            load=load,
            seed=args.seed,
            engine=engine_cfg,
            link_bytes_per_s=args.link_gbps * 1e9 if args.link_gbps else None,
            tpot_slo_s=args.slo_tpot,
        )
        with tqdm(
            total=len(trace.requests), desc=desc, unit="req", disable=args.quiet, leave=False
        ) as bar:
            return simulate_pd(trace, router, cfg, on_request=bar.update)

    results: dict[str, Any] = {}
    for router in routers:
        results[router] = one_run(router, args.load, f"{router} @ load {args.load:g}").summary
    capacity: dict[str, Any] = {}
    if args.find_capacity:
        for router in routers:

            def p90_at(load: float, router: str = router) -> float:
                return capacity_p90(
                    one_run(router, load, f"{router} capacity @ {load:.3g}").summary
                )

            found = find_capacity(
                p90_at, slo=slo, start=args.load, precision=args.capacity_precision
            )
            capacity[router] = {
                "slo_ttft_p90": slo,
                "max_load": found.max_load,
                "probes": [list(p) for p in found.probes],
            }
    title = f"{trace.name}: PD {prefill}P+{decode}D x {args.profile}, load {args.load:g}"
    print(format_table(results, title=title))
    for router, res in results.items():
        print(f"  {router}: p90 TPOT {res['tpot_p90'] * 1000:.2f} ms")
    for router, cap in capacity.items():
        print(f"  capacity at p90 TTFT <= {slo:g} s: {router} {cap['max_load']:.3f}")
    if args.json is not None:
        doc: dict[str, Any] = {
            "trace": trace.name,
            "pd": {"prefill": prefill, "decode": decode},
            "profile": args.profile,
            "load": args.load,
            "slo_tpot": args.slo_tpot,
            "results": results,
        }
        if capacity:
            doc["capacity"] = capacity
        write_json(args.json, doc)
    print(f"PD pool: {prefill} prefill + {decode} decode servers", file=sys.stderr)
    return 0
