"""Does following KV events make the cost policy worse in simulation? Capacity with and without.

For each workload of the standard comparison (benchmarks/sim_compare.py: 8 backends, p90
TTFT SLO, 5% precision), the cost policy's capacity with its modelled cache and with the
simulated engines' KV events driving its prefix index (`SimConfig(kv_events=True)`, what
`serve` does with SGLang's events). The issue's bar: events within 2% of the model or better.
Results: benchmarks/results/sim_kv_events.json. Figures from a shared 2-core box (virtual
time: the capacities do not depend on the machine).

Run:  python benchmarks/sim_kv_events.py        (several minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_compare import WORKLOADS, load_workload_trace

from router.replay.metrics import write_json
from router.replay.simulate import (
    SimConfig,
    capacity_p90,
    find_capacity,
    simulate_policy,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _capacity(args: tuple[str, bool, int, float]) -> dict[str, Any]:
    workload, events, backends, slo = args
    trace = load_workload_trace(workload)
    profile = WORKLOADS[workload].profile

    def p90_at(load: float) -> float:
        cfg = SimConfig(profiles=(profile,) * backends, load=load, kv_events=events)
        return capacity_p90(simulate_policy(trace, "cost", cfg).summary)

    found = find_capacity(p90_at, slo=slo, start=1.0)
    at_one = simulate_policy(
        trace, "cost", SimConfig(profiles=(profile,) * backends, load=1.0, kv_events=events)
    ).summary
    return {
        "max_load": found.max_load,
        "probes": found.probes,
        "at_load_1": {k: at_one[k] for k in ("ttft_p90", "hit_ratio") if k in at_one},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--backends", type=int, default=8)
    ap.add_argument("--slo", type=float, default=2.0, help="p90 TTFT SLO (s)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    names = [w for w in args.workloads.split(",") if w]
    jobs = [(w, ev, args.backends, args.slo) for w in names for ev in (False, True)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(_capacity, jobs))
    doc: dict[str, Any] = {
        "policy": "cost",
        "backends": args.backends,
        "slo_ttft_p90": args.slo,
        "note": "capacity = highest load with p90 TTFT <= SLO, 5% precision; shared 2-core box",
        "workloads": {},
    }
    for (workload, events, _b, _s), res in zip(jobs, results, strict=True):
        doc["workloads"].setdefault(workload, {})["events" if events else "modelled"] = res
    for workload, row in doc["workloads"].items():
        m, e = row["modelled"]["max_load"], row["events"]["max_load"]
        row["events_vs_modelled"] = round(e / m, 4) if m else None
        print(f"{workload:14s} capacity modelled {m:.3f}  events {e:.3f}  ratio {e / m:.3f}")
    write_json(RESULTS / "sim_kv_events.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
