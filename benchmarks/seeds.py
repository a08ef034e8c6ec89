"""Capacity on generated workloads the policies were not developed on: other seeds.

The standard comparison (sim_compare.py) uses seed 1 of each generated trace. This script
regenerates the multi-turn and shared-prefix traces with other seeds (same shape, different
sessions, groups and arrival times) and finds each policy's capacity (highest load with p90
TTFT <= 2 s, 8 backends, llama3-8b-h100) on each, so a reader can see whether the ordering of
the policies holds beyond the one trace the figures in the README come from.

Run:  python benchmarks/seeds.py --json benchmarks/results/seeds.json     (~10 minutes, 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from router.replay.gentrace import MultiTurnConfig, SharedPrefixConfig, multi_turn, shared_prefix
from router.replay.metrics import write_json
from router.replay.simulate import SimConfig, capacity_p90, find_capacity, simulate_policy
from router.replay.traces import Trace

PROFILE = "llama3-8b-h100"


def _trace(workload: str, seed: int) -> Trace:
    if workload == "multi-turn":
        return multi_turn(MultiTurnConfig(seed=seed))
    if workload == "shared-prefix":
        return shared_prefix(SharedPrefixConfig(seed=seed))
    raise SystemExit(f"unknown workload {workload!r}")


def _capacity(job: tuple[str, int, str, int, float]) -> dict[str, Any]:
    workload, seed, policy, backends, precision = job
    trace = _trace(workload, seed)

    def p90_at(load: float) -> float:
        run = simulate_policy(trace, policy, SimConfig(profiles=(PROFILE,) * backends, load=load))
        return capacity_p90(run.summary)

    found = find_capacity(p90_at, slo=2.0, start=4.0, precision=precision)
    return {"workload": workload, "seed": seed, "policy": policy, "capacity": found.max_load}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default="multi-turn,shared-prefix")
    p.add_argument("--seeds", default="2,3,4", help="comma-separated seeds (1 is sim_compare's)")
    p.add_argument("--policies", default="round_robin,cache_aware,cost")
    p.add_argument("--backends", type=int, default=8)
    p.add_argument("--precision", type=float, default=0.03, help="capacity search precision")
    p.add_argument("--workers", type=int, default=2, help="processes (one simulation each)")
    p.add_argument("--json", required=True, help="where to write the results")
    args = p.parse_args()
    jobs = [
        (w.strip(), int(s), pol.strip(), args.backends, args.precision)
        for w in args.workloads.split(",")
        for s in args.seeds.split(",")
        for pol in args.policies.split(",")
    ]
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for row in pool.map(_capacity, jobs):
            rows.append(row)
            print(f"{row['workload']:<14} seed {row['seed']}  {row['policy']:<12} "
                  f"capacity {row['capacity']:.2f}", flush=True)  # fmt: skip
    summary: dict[str, Any] = {}
    for w in {r["workload"] for r in rows}:
        cap = {(r["seed"], r["policy"]): r["capacity"] for r in rows if r["workload"] == w}
        seeds = sorted({s for s, _ in cap})
        ratios = {
            f"cost_over_{base}": [cap[(s, "cost")] / cap[(s, base)] for s in seeds]
            for base in ("round_robin", "cache_aware")
            if all((s, base) in cap and (s, "cost") in cap for s in seeds)
        }
        summary[w] = {k: {"per_seed": v, "min": min(v), "median": statistics.median(v)}
                      for k, v in ratios.items()}  # fmt: skip
    doc = {"slo_ttft_p90": 2.0, "backends": args.backends, "profile": PROFILE,
           "precision": args.precision, "results": rows, "summary": summary}  # fmt: skip
    write_json(Path(args.json), doc)
    for w, s in sorted(summary.items()):
        for k, v in s.items():
            print(f"{w:<14} {k:<24} per seed {[round(x, 2) for x in v['per_seed']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
