"""Fidelity: the same window through `simulate` (virtual time) and `compare` (live HTTP).

Runs the window through the virtual-time simulator for round_robin, cache_aware and cost, then
through `prefix-router compare` with our router (the same three policies) and the real
sglang-router 0.3.2 (cache_aware, round_robin). For each pair it reports live/sim mean TTFT;
the target is agreement within 15%. Pairs:

    sim cost         <-> live cost
    sim cache_aware  <-> live cache_aware, live sglang-router:cache_aware
    sim round_robin  <-> live round_robin, live sglang-router:round_robin

Result: benchmarks/results/fidelity_<name>.json (+ the live run's CDF .png).

Run:  python benchmarks/fidelity.py                 (conversation window, 4 x h100-hicache)
      python benchmarks/fidelity.py --duration 60 --speedup 2 --name quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from router.replay.metrics import json_safe
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import bundled, load_trace

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {
    "cost": ["cost"],
    "cache_aware": ["cache_aware", "sglang-router:cache_aware"],
    "round_robin": ["round_robin", "sglang-router:round_robin"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", default="conversation")
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--profile", default="llama3-8b-h100-hicache")
    p.add_argument("--start", type=float, default=600.0)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--load", type=float, default=1.0)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--name", default="conversation")
    args = p.parse_args()

    path = Path(args.trace)
    trace = load_trace(path if path.exists() else bundled(args.trace))
    window = trace.window(args.start, args.duration)
    cfg = SimConfig(profiles=(args.profile,) * args.backends, load=args.load)
    sim = {pol: simulate_policy(window, pol, cfg).summary for pol in PAIRS}

    RESULTS.mkdir(parents=True, exist_ok=True)
    live_json = Path(tempfile.mkdtemp()) / "live.json"
    targets = ",".join(t for ts in PAIRS.values() for t in ts)
    cmd = [
        sys.executable, "-m", "router", "compare", "--trace", args.trace,
        "--backends", str(args.backends), "--profile", args.profile,
        "--start", f"{args.start:g}", "--duration", f"{args.duration:g}",
        "--load", f"{args.load:g}", "--speedup", f"{args.speedup:g}", "--targets", targets,
        "--json", str(live_json), "--plot", str(RESULTS / f"fidelity_{args.name}.png"), "--quiet",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    live = json.loads(live_json.read_text())["results"]

    pairs: list[dict[str, Any]] = []
    for pol, live_targets in PAIRS.items():
        for target in live_targets:
            s, lv = sim[pol]["ttft_mean"], live[target]["ttft_mean"]
            ratio = lv / s if s else float("nan")
            pairs.append({
                "sim_policy": pol, "live_target": target, "sim_ttft_mean": s,
                "live_ttft_mean": lv, "ratio": ratio,
                "sim_ttft_p90": sim[pol]["ttft_p90"], "live_ttft_p90": live[target]["ttft_p90"],
                "sim_hit_ratio": sim[pol]["hit_ratio"], "live_hit_ratio": live[target]["hit_ratio"],
                "within_tolerance": abs(ratio - 1) <= args.tolerance,
            })  # fmt: skip
            print(f"{pol:12s} sim {s:7.3f}  {target:26s} live {lv:7.3f}  ratio {ratio:.3f}")
    doc = {
        "trace": window.name, "backends": args.backends, "profile": args.profile,
        "start": args.start, "duration": args.duration, "load": args.load,
        "speedup": args.speedup, "tolerance": args.tolerance,
        "sim": sim, "live": live, "pairs": pairs,
    }  # fmt: skip
    out = RESULTS / f"fidelity_{args.name}.json"
    out.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
