"""PD disaggregation against one mixed pool, same GPU count, in virtual time.

For each workload of sim_compare.py (conv-h100, conv-hicache, multi-turn, shared-prefix):
  PD 4P+4D    pair (ours: the paired price of router/core/pd.py) and
              cache_aware+power_of_two (SMG's PD defaults, each side chosen on its own)
  mixed 8     cost (ours) and cache_aware (sglang-router's rule)
it finds each router's capacity (highest load, x the trace's arrival rate, to 5%) at
  - p90 TTFT <= 2 s,
  - p90 TPOT <= 20 ms (50 tokens/s per stream),
  - both at once,
with no failed request. Every run is memoised per (router, load), so the three searches share
their probes; the plot draws p90 TTFT and p90 TPOT of every probe against load.
Results: benchmarks/results/pd_<workload>.json and .png. Figures were taken on a shared 2-core
box; they are virtual-time results, so the box's speed changes only the wall time.

Run:  python benchmarks/pd_compare.py                  (~15 min with --jobs 2)
      python benchmarks/pd_compare.py --workloads multi-turn --pd 2:6
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from router.replay.metrics import write_json
from router.replay.pd_simulate import PDSimConfig, simulate_pd, tpot_p90
from router.replay.simulate import SimConfig, find_capacity, simulate_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported
from sim_compare import WORKLOADS, load_workload_trace

RESULTS = Path(__file__).resolve().parent / "results"
PD_ROUTERS = ("pair", "cache_aware+power_of_two")
MIXED_POLICIES = ("cost", "cache_aware")


def _measure(workload: str, target: str, pd: tuple[int, int], load: float) -> dict[str, Any]:
    """One run: target is 'pd:<router>' or 'mixed:<policy>'."""
    trace = load_workload_trace(workload)
    profile = WORKLOADS[workload].profile
    kind, name = target.split(":", 1)
    if kind == "pd":
        cfg = PDSimConfig(prefill=pd[0], decode=pd[1], profile=profile, load=load)
        summary = dict(simulate_pd(trace, name, cfg).summary)
    else:
        run = simulate_policy(trace, name, SimConfig(profiles=(profile,) * sum(pd), load=load))
        summary = dict(run.summary)
        summary["tpot_p90"] = tpot_p90(run.outcomes)
    keep = ("failed", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_mean", "tpot_p90", "hit_ratio")
    return {"load": load, **{k: summary[k] for k in keep}}


def _search(args: tuple[str, str, tuple[int, int], float, float]) -> dict[str, Any]:
    workload, target, pd, slo_ttft, slo_tpot = args
    probes: dict[float, dict[str, Any]] = {}

    def run(load: float) -> dict[str, Any]:
        key = round(load, 6)
        if key not in probes:
            probes[key] = _measure(workload, target, pd, key)
        return probes[key]

    def metric(pick: Callable[[dict[str, Any]], float]) -> Callable[[float], float]:
        def at(load: float) -> float:
            row = run(load)
            return math.inf if row["failed"] else pick(row)

        return at

    both = max(slo_ttft, slo_tpot)  # a scale-free "both within": each divided by its SLO

    def joint(row: dict[str, Any]) -> float:
        return both * max(float(row["ttft_p90"]) / slo_ttft, float(row["tpot_p90"]) / slo_tpot)

    caps = {
        "ttft": find_capacity(metric(lambda r: r["ttft_p90"]), slo=slo_ttft, start=1.0),
        "tpot": find_capacity(metric(lambda r: r["tpot_p90"]), slo=slo_tpot, start=1.0),
        "both": find_capacity(metric(joint), slo=both, start=1.0),
    }
    return {
        "capacity": {k: c.max_load for k, c in caps.items()},
        "probes": [probes[k] for k in sorted(probes)],
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for target, res in doc["targets"].items():
        rows = [r for r in res["probes"] if not r["failed"]]
        loads = [r["load"] for r in rows]
        style = "-" if target.startswith("pd:") else "--"
        ax1.plot(loads, [r["ttft_p90"] for r in rows], style, marker="o", ms=3, label=target)
        ax2.plot(loads, [r["tpot_p90"] * 1000 for r in rows], style, marker="o", ms=3, label=target)
    ax1.axhline(doc["slo_ttft_p90"], color="grey", linestyle=":", linewidth=1)
    ax2.axhline(doc["slo_tpot_p90"] * 1000, color="grey", linestyle=":", linewidth=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("p90 TTFT (s, log)")
    ax2.set_ylabel("p90 TPOT (ms)")
    for ax in (ax1, ax2):
        ax.set_xlabel("load (x the trace's arrival rate)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    pd = doc["pd"]
    fig.suptitle(
        f"{doc['workload']}: PD {pd['prefill']}P+{pd['decode']}D vs mixed "
        f"{pd['prefill'] + pd['decode']} x {doc['profile']} (solid: PD, dashed: mixed)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cap(load: float) -> str:
    """A capacity; the search's ceiling (2^23: never missed) reads as unbounded."""
    return "unbounded" if load >= 2**20 else f"{load:.2f}"


def table(out: Path, workloads: list[str], suffix: str = "") -> str:
    """The README's markdown table, read from the committed JSON (never typed by hand)."""
    import json

    rows = [
        "| workload | target | cap. p90 TTFT <= 2 s (highest probe within) |"
        " cap. p90 TPOT <= 20 ms | cap. both |"
        " at pair's TTFT cap.: load, p90 TTFT, p90 TPOT, hit |",
        "|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        path = out / f"pd_{workload}{suffix}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        common = doc["at_pair_capacity"]
        for target, res in doc["targets"].items():
            cap = res["capacity"]
            row = common[target]
            at = (
                f"{common['load']:.2f}, {row['ttft_p90']:.3f} s, {row['tpot_p90'] * 1000:.1f} ms,"
                f" {row['hit_ratio']:.2f}"
                if not row["failed"]
                else f"{common['load']:.2f}, {row['failed']} failed"
            )
            within = [
                r["load"]
                for r in res["probes"]
                if not r["failed"] and r["ttft_p90"] <= doc["slo_ttft_p90"]
            ]
            top = f" ({max(within):.2f})" if within and max(within) > cap["ttft"] * 1.001 else ""
            rows.append(
                f"| {workload} | {target} | {_cap(cap['ttft'])}{top} | {_cap(cap['tpot'])} | "
                f"{_cap(cap['both'])} | {at} |"
            )
    return "\n".join(rows)


def splits_table(out: Path, workloads: list[str]) -> str:
    """Pair's capacity (TTFT, and both SLOs) per split, beside the mixed pool's cost."""
    import json

    splits = (("2P+6D", "_2p6d"), ("4P+4D", ""), ("6P+2D", "_6p2d"))
    rows = [
        "| workload | " + " | ".join(name for name, _ in splits) + " | mixed 8, cost |",
        "|---|---|---|---|---|",
    ]
    for workload in workloads:
        cells: list[str] = []
        mixed = "-"
        for _, suffix in splits:
            path = out / f"pd_{workload}{suffix}.json"
            if not path.exists():
                cells.append("-")
                continue
            targets = json.loads(path.read_text())["targets"]
            cap = targets["pd:pair"]["capacity"]
            cells.append(f"{_cap(cap['ttft'])} ({_cap(cap['both'])})")
            ref = targets["mixed:cost"]["capacity"]
            mixed = f"{_cap(ref['ttft'])} ({_cap(ref['both'])})"
        rows.append(f"| {workload} | " + " | ".join(cells) + f" | {mixed} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--pd", default="4:4", help="prefill:decode servers (default 4:4)")
    parser.add_argument("--slo-ttft-p90", type=float, default=2.0)
    parser.add_argument("--slo-tpot-p90", type=float, default=0.020)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the README table and stop")
    parser.add_argument(
        "--splits-table", action="store_true", help="print the README's table of splits and stop"
    )
    args = parser.parse_args(argv)
    p, d = (int(x) for x in args.pd.split(":"))
    if args.splits_table:
        print(splits_table(args.out, args.workloads.split(",")))
        return 0
    if args.table:
        suffix = "" if (p, d) == (4, 4) else f"_{p}p{d}d"
        print(table(args.out, args.workloads.split(","), suffix))
        return 0
    targets = [f"pd:{r}" for r in PD_ROUTERS] + [f"mixed:{m}" for m in MIXED_POLICIES]
    suffix = "" if (p, d) == (4, 4) else f"_{p}p{d}d"
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        jobs = {
            (w, t): pool.submit(_search, (w, t, (p, d), args.slo_ttft_p90, args.slo_tpot_p90))
            for w in args.workloads.split(",")
            for t in targets
        }
        for workload in args.workloads.split(","):
            found = {t: jobs[(workload, t)].result() for t in targets}
            # every target at the PD pair's TTFT capacity: the same traffic, side by side
            common = found["pd:pair"]["capacity"]["ttft"] or 1.0
            at = {t: pool.submit(_measure, workload, t, (p, d), common) for t in targets}
            doc = {
                "workload": workload,
                "profile": WORKLOADS[workload].profile,
                "pd": {"prefill": p, "decode": d},
                "mixed_backends": p + d,
                "slo_ttft_p90": args.slo_ttft_p90,
                "slo_tpot_p90": args.slo_tpot_p90,
                "machine": "shared 2-core box, no GPU; virtual time (simulated engines)",
                "command": "python benchmarks/pd_compare.py " + " ".join(argv or sys.argv[1:]),
                "targets": found,
                "at_pair_capacity": {"load": common, **{t: f.result() for t, f in at.items()}},
                "wall_s": time.perf_counter() - started,
            }
            write_json(args.out / f"pd_{workload}{suffix}.json", doc)
            plot(doc, args.out / f"pd_{workload}{suffix}.png")
            caps = "; ".join(
                f"{t} ttft {r['capacity']['ttft']:.2f} tpot {r['capacity']['tpot']:.2f} "
                f"both {r['capacity']['both']:.2f}"
                for t, r in doc["targets"].items()
            )
            print(f"{workload}: {caps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
