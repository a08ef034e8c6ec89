"""The standard virtual-time comparison: every policy, several workloads, loads up to saturation.

For each workload (8 backends each):
  conv-h100      the Mooncake conversation trace on llama3-8b-h100
  conv-hicache   the same trace on llama3-8b-h100-hicache (host tier 4x the GPU pool)
  multi-turn     a generated multi-turn chat trace on llama3-8b-h100
  shared-prefix  a generated shared-prefix trace on llama3-8b-h100
it finds each policy's capacity (highest load with p90 TTFT <= the SLO, 5% precision), sweeps
loads from a quarter of the best capacity to past it, and measures every policy at
round_robin's capacity.
Results: benchmarks/results/sim_<workload>.json and .png (p90 TTFT against load).

Run:  python benchmarks/sim_compare.py            (about 15-25 minutes on 2 cores)
      python benchmarks/sim_compare.py --workloads multi-turn --policies round_robin,cost
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.replay.analyze import ideal_hit_ratio, lru_hit_ratio
from router.replay.gentrace import MultiTurnConfig, SharedPrefixConfig, multi_turn, shared_prefix
from router.replay.metrics import write_json
from router.replay.simulate import SimConfig, capacity_p90, find_capacity, simulate_policy
from router.replay.traces import Trace, bundled, load_trace

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("round_robin", "least_load", "cache_aware", "cost", "oracle")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    profile: str
    loads: tuple[float, ...]


WORKLOADS = {
    "conv-h100": Workload("conv-h100", "llama3-8b-h100", (0.5, 1.0)),
    "conv-hicache": Workload("conv-hicache", "llama3-8b-h100-hicache", (0.5, 1.0)),
    "multi-turn": Workload("multi-turn", "llama3-8b-h100", (0.5, 1.0)),
    "shared-prefix": Workload("shared-prefix", "llama3-8b-h100", (0.5, 1.0)),
}
# Sweep points as fractions of the best capacity found (plus each workload's own loads).
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)


def load_workload_trace(name: str) -> Trace:
    if name.startswith("conv"):
        return load_trace(bundled("conversation"))
    if name == "multi-turn":
        return multi_turn(MultiTurnConfig(seed=1))
    return shared_prefix(SharedPrefixConfig(seed=1))


def _run(args: tuple[str, str, float, int]) -> dict[str, Any]:
    workload, policy, load, backends = args
    trace = load_workload_trace(workload)
    cfg = SimConfig(profiles=(WORKLOADS[workload].profile,) * backends, load=load)
    return simulate_policy(trace, policy, cfg).summary


def _capacity(args: tuple[str, str, int, float]) -> dict[str, Any]:
    workload, policy, backends, slo = args
    trace = load_workload_trace(workload)
    profile = WORKLOADS[workload].profile

    def p90_at(load: float) -> float:
        cfg = SimConfig(profiles=(profile,) * backends, load=load)
        return capacity_p90(simulate_policy(trace, policy, cfg).summary)

    found = find_capacity(p90_at, slo=slo, start=1.0)
    return {"max_load": found.max_load, "slo_ttft_p90": slo, "probes": found.probes}


def plot(workload: str, doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for policy, rows in doc["sweep"].items():
        loads = [r["load"] for r in rows]
        ax.plot(loads, [r["ttft_p90"] for r in rows], marker="o", label=policy)
    ax.axhline(doc["slo_ttft_p90"], color="grey", linestyle=":", linewidth=1)
    for policy, cap in doc["capacity"].items():
        ax.axvline(cap["max_load"], color="grey", linewidth=0.4, alpha=0.6)
        ax.annotate(policy, (cap["max_load"], doc["slo_ttft_p90"]), fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_xlabel("load (x the trace's arrival rate)")
    ax.set_ylabel("p90 TTFT (s, log)")
    ax.set_title(
        f"{workload}: {doc['backends']} x {doc['profile']} "
        f"(ideal hit {doc['ideal_hit_ratio']:.2f}, LRU bound {doc['lru_bound_hit_ratio']:.2f})",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_workload(
    name: str, policies: list[str], backends: int, slo: float, pool: ProcessPoolExecutor
) -> dict[str, Any]:
    spec = WORKLOADS[name]
    trace = load_workload_trace(name)
    from backends.sim.perf import get_profile

    prof = get_profile(spec.profile)
    pool_tokens = backends * (prof.kv_capacity_tokens + prof.host_capacity_tokens)
    started = time.perf_counter()
    cap_jobs = [(name, p, backends, slo) for p in policies]
    cap_futs = [pool.submit(_capacity, job) for job in cap_jobs]
    capacity = {job[1]: fut.result() for job, fut in zip(cap_jobs, cap_futs, strict=True)}
    # Sweep from light load to past the best policy's capacity, so every curve saturates.
    top = max((c["max_load"] for c in capacity.values()), default=1.0) or 1.0
    loads = sorted({round(top * f, 3) for f in SWEEP_FRACTIONS} | set(spec.loads))
    sweep_jobs = [(name, p, load, backends) for p in policies for load in loads]
    sweep_futs = [pool.submit(_run, job) for job in sweep_jobs]
    rr_cap = capacity.get("round_robin", {}).get("max_load", 1.0) or 1.0
    at_rr_futs = {p: pool.submit(_run, (name, p, rr_cap, backends)) for p in policies}
    sweep: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for job, fut in zip(sweep_jobs, sweep_futs, strict=True):
        row = dict(fut.result())
        row["load"] = job[2]
        sweep[job[1]].append(row)
    at_rr = {p: f.result() for p, f in at_rr_futs.items()}
    doc = {
        "trace": trace.name,
        "workload": name,
        "backends": backends,
        "profile": spec.profile,
        "requests": len(trace.requests),
        "ideal_hit_ratio": ideal_hit_ratio(trace),
        "lru_bound_hit_ratio": lru_hit_ratio(trace, pool_tokens),
        "pool_cache_tokens": pool_tokens,
        "slo_ttft_p90": slo,
        "sweep": sweep,
        "capacity": capacity,
        "at_round_robin_capacity": {"load": rr_cap, "results": at_rr},
        "wall_s": time.perf_counter() - started,
    }
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--backends", type=int, default=8)
    parser.add_argument("--slo-ttft-p90", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for name in args.workloads.split(","):
            doc = run_workload(name, policies, args.backends, args.slo_ttft_p90, pool)
            write_json(args.out / f"sim_{name}.json", doc)
            plot(name, doc, args.out / f"sim_{name}.png")
            caps = ", ".join(f"{p} {c['max_load']:.2f}" for p, c in doc["capacity"].items())
            print(f"{name}: capacity at p90 TTFT <= {args.slo_ttft_p90:g}s: {caps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
