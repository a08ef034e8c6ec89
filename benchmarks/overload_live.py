"""Live overload, each router with its own admission: ours with the scheduler, SMG with its queue.

The multi-turn window of benchmarks/live.md ([240 s +120 s] of `gen-trace --kind multi-turn
--seed 1`, 4 fresh simulated H100s per target, a chunk every 0.1 s) at `--load` (default 10.2:
twice round_robin's capacity there), through `prefix-router compare` with targets `cost`,
`cost+queue` (`serve --scheduler on --slo-ttft 2`), `smg:cache_aware` and
`smg:cache_aware+queue` (`--max-concurrent-requests 128 --queue-size 100
--queue-timeout-secs 2`). Per target: goodput (requests whose TTFT met the 2 s deadline, per
second of arrivals), requests shed (429, or SMG's queue timeout), p90 TTFT of the admitted
ones, other failures.

Run:  flock /tmp/prefix-router-heavy.lock python benchmarks/overload_live.py   (~3 minutes)
      ... --load 15 --json benchmarks/results/live_overload_15.json
      python benchmarks/overload_live.py --tables
Writes benchmarks/results/live_overload.json (compare's JSON plus "overload") and .png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from router.replay.client import failure_status
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.metrics import percentile, write_json
from router.replay.traces import write_mooncake

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = "cost,cost+queue,smg:cache_aware,smg:cache_aware+queue"


def summarise(outcomes: list[dict[str, Any]], deadline: float, arrival_s: float) -> dict[str, Any]:
    """Goodput, shed and the admitted requests' p90 TTFT of one target's outcomes."""
    ok = sorted(o["ttft"] for o in outcomes if o["ttft"] is not None and not o.get("error"))
    statuses = [failure_status(o.get("error")) for o in outcomes if o.get("error")]
    shed = sum(1 for s in statuses if s in (408, 429, 503))
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "shed": shed,
        "other_failures": len(statuses) - shed,
        "failure_statuses": sorted({s for s in statuses if s is not None}),
        "goodput_rps": sum(1 for t in ok if t <= deadline) / arrival_s,
        "within_deadline_share": sum(1 for t in ok if t <= deadline) / max(len(outcomes), 1),
        "admitted_ttft_p90": percentile(ok, 90),
        "admitted_ttft_p99": percentile(ok, 99),
    }


def tables(paths: list[Path]) -> str:
    """The README table of committed runs (benchmarks/README.md, the scheduler section)."""
    out = [
        "| load | target | goodput req/s | within 2 s | shed | admitted p90 TTFT | p99 | TPOT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        doc = json.loads(path.read_text())
        for target, o in doc["overload"].items():
            tpot = doc["results"][target]["tpot_mean"] * 1000
            out.append(
                f"| {doc['load']:g} | {target} | {o['goodput_rps']:.1f} | "
                f"{o['within_deadline_share']:.3f} | {o['shed']} | {o['admitted_ttft_p90']:.2f} | "
                f"{o['admitted_ttft_p99']:.2f} | {tpot:.0f} |"
            )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", type=float, default=10.2, help="arrival-rate multiplier")
    p.add_argument("--deadline", type=float, default=2.0, help="TTFT deadline (seconds)")
    p.add_argument("--targets", default=TARGETS)
    p.add_argument("--json", type=Path, default=RESULTS / "live_overload.json")
    p.add_argument(
        "--tables",
        nargs="*",
        type=Path,
        metavar="JSON",
        default=None,
        help="print the table of these results (default: live_overload*.json) and stop",
    )
    args = p.parse_args()
    if args.tables is not None:
        print(tables(args.tables or sorted(RESULTS.glob("live_overload*.json"))))
        return 0
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        trace = Path(tmp) / "multi_turn_seed1.jsonl"
        write_mooncake(multi_turn(MultiTurnConfig(seed=1)), trace)
        outcomes_path = Path(tmp) / "outcomes.json"
        subprocess.run(
            [sys.executable, "-m", "router", "compare", "--trace", str(trace), "--backends", "4",
             "--profile", "llama3-8b-h100", "--start", "240", "--duration", "120",
             "--load", f"{args.load:g}", "--stream-interval", "0.1",
             "--slo-ttft-p90", f"{args.deadline:g}", "--targets", args.targets,
             "--json", str(args.json), "--outcomes", str(outcomes_path),
             "--plot", str(args.json.with_suffix(".png")), "--quiet"],
            check=True,
        )  # fmt: skip
        outcomes = json.loads(outcomes_path.read_text())
    doc: dict[str, Any] = json.loads(args.json.read_text())
    arrival_s = 120.0 / args.load
    doc["overload"] = {
        target: summarise(rows, args.deadline, arrival_s) for target, rows in outcomes.items()
    }
    doc["command"] = "python benchmarks/overload_live.py " + " ".join(sys.argv[1:])
    doc["machine"] = "shared 2-core box; 4 simulated H100s per target"
    write_json(args.json, doc)
    print(json.dumps(doc["overload"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
