"""Routing quality when N worker processes split the decisions (virtual time, no sockets).

`serve --workers N` gives each worker its own routing core; each hears the others' routed /
first-token / ended events a few milliseconds later (the supervisor's hub batches them over
2 ms). `SimConfig(views=N, sync_delay_s=d)` plays that: arrivals are dealt to the views in
turn (the worst case: a conversation's turns alternate between workers), each view routes
with its own beliefs, and the others hear of it `d` later. Compared here, per window, with the
cost policy on 4 simulated backends: one view (one process), 2 views sharing at once (d = 0),
2 and 4 views sharing at d = 3 ms, and 2 views sharing nothing (d = inf: two independent
routers behind one port).

Windows: the live comparison's (benchmarks/live_compare.py): multi-turn seeds 1-3
[240 s + 120 s] at load 5.104 on llama3-8b-h100, and the Mooncake conversation trace at four
starts [+120 s] at load 0.937 on llama3-8b-h100-hicache.

Run: python benchmarks/workers_sim.py --json benchmarks/results/workers_sim.json  (~1 minute)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace, bundled, load_trace

VARIANTS = ((1, 0.0), (2, 0.0), (2, 0.003), (4, 0.003), (2, math.inf))
KEYS = ("ttft_p50", "ttft_p90", "ttft_mean", "hit_ratio", "failed")


def _windows() -> list[tuple[str, Trace, str, float]]:
    out = [
        (f"multi-turn seed {s}", multi_turn(MultiTurnConfig(seed=s)).window(240.0, 120.0),
         "llama3-8b-h100", 5.104)
        for s in (1, 2, 3)
    ]  # fmt: skip
    conversation = load_trace(bundled("conversation"))
    out += [
        (f"conversation {start:g}s", conversation.window(start, 120.0),
         "llama3-8b-h100-hicache", 0.937)
        for start in (300.0, 600.0, 900.0, 1200.0)
    ]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    print(f"{'window':22} {'views':>5} {'delay':>6} {'p50':>6} {'p90':>6} {'hit':>6}")
    for name, window, profile, load in _windows():
        for views, delay in VARIANTS:
            config = SimConfig(profiles=(profile,) * 4, load=load, views=views, sync_delay_s=delay)
            s = simulate_policy(window, "cost", config).summary
            row = {"window": name, "requests": s["requests"], "views": views,
                   "sync_delay_s": None if math.isinf(delay) else delay,
                   **{k: round(float(s[k]), 4) for k in KEYS}}  # fmt: skip
            rows.append(row)
            shown = "none" if math.isinf(delay) else f"{delay * 1e3:g}ms"
            print(
                f"{name:22} {views:5} {shown:>6} {s['ttft_p50']:6.3f} {s['ttft_p90']:6.3f} "
                f"{s['hit_ratio']:6.3f}",
                flush=True,
            )
    if args.json:
        doc = {
            "policy": "cost",
            "backends": 4,
            "note": "virtual time; arrivals dealt to views in turn; delay none = no sharing",
            "results": rows,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
