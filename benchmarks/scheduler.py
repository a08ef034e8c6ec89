"""The router-side scheduler (router/core/scheduler.py) in the simulated pool: does it pay?

Three measurements, 8 x llama3-8b-h100 (conv-hicache: the HiCache profile), SLO p90 TTFT 2 s:

(a) capacity: the highest load whose p90 TTFT stays within the SLO with no request failed
    (a shed request is a failed one), `cost` without and with the scheduler, on the four
    workloads of sim_compare.py and on seeds 2-4 of the generated ones. The oracle's capacity
    is read from the committed sim_<workload>.json (same search, 5%), not rerun.
(b) overload: goodput (requests with TTFT <= 2 s per second of arrivals), shed share and p90
    TTFT of the admitted requests at 1x, 1.5x and 2x the capacity of `cost` without the
    scheduler; with the scheduler, deadline admission at 2 s sheds on arrival.
(c) fairness: a small tenant (multi-turn seed 2, whole conversations, ~10% of requests) beside
    a flooding one (multi-turn seed 1 at 3x cost's capacity): the small tenant's p90 TTFT
    against its figure alone on the same pool, without the scheduler, with it, and with it
    sending engine priorities (the engines run SGLang's --enable-priority-scheduling) with
    0, 10% and 50% of each backend kept for the under-share tenant (the trade-off: the more
    kept, the nearer solo the small tenant and the less the flood gets).

Run:  flock /tmp/prefix-router-heavy.lock python benchmarks/scheduler.py   (~25 min, 2 cores)
      python benchmarks/scheduler.py --parts a --workloads multi-turn --precision 0.05
      python benchmarks/scheduler.py --tables          (the README's tables from the JSON)
Writes benchmarks/results/scheduler.json and scheduler.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from router.core.scheduler import SchedulerConfig
from router.replay.gentrace import MultiTurnConfig, SharedPrefixConfig, multi_turn, shared_prefix
from router.replay.metrics import write_json
from router.replay.simulate import SimConfig, capacity_p90, find_capacity, simulate_policy
from router.replay.traces import Trace, TraceRequest, bundled, load_trace

RESULTS = Path(__file__).resolve().parent / "results"
SLO = 2.0
PROFILES = {"conv-hicache": "llama3-8b-h100-hicache"}
WORKLOADS = ("conv-h100", "conv-hicache", "multi-turn", "shared-prefix")
SEEDS = (2, 3, 4)
# Capacity runs: no admission (a shed request would fail the run), order by the SLO.
CAPACITY_SCHEDULER = SchedulerConfig(late_last_s=SLO)
# Overload runs: admission by the 2 s deadline as well.
ADMISSION_SCHEDULER = SchedulerConfig(slo_ttft_s=SLO)
# Fairness runs with engine priority: the share of each backend kept for under-share tenants.
RESERVES = (0.0, 0.1, 0.5)


def trace_for(workload: str, seed: int = 1) -> Trace:
    if workload.startswith("conv"):
        return load_trace(bundled("conversation"))
    if workload == "multi-turn":
        return multi_turn(MultiTurnConfig(seed=seed))
    return shared_prefix(SharedPrefixConfig(seed=seed))


def _config(workload: str, load: float, scheduler: SchedulerConfig | None) -> SimConfig:
    profile = PROFILES.get(workload, "llama3-8b-h100")
    return SimConfig(profiles=(profile,) * 8, load=load, scheduler=scheduler, goodput_slo_s=SLO)


def _capacity(job: tuple[str, int, bool, float, float]) -> dict[str, Any]:
    workload, seed, on, precision, start = job
    trace = trace_for(workload, seed)
    scheduler = CAPACITY_SCHEDULER if on else None

    def p90_at(load: float) -> float:
        run = simulate_policy(trace, "cost", _config(workload, load, scheduler))
        return capacity_p90(run.summary)

    if not on:
        found = find_capacity(p90_at, slo=SLO, start=start, precision=precision)
        probes, capacity = list(found.probes), found.max_load
    else:
        # From the capacity without the scheduler (`start`), in steps of `precision`: a
        # doubling bracket would run it at 2x capacity, where holding thousands of requests
        # makes a run take many minutes on this box and says nothing about the answer.
        probes, capacity = [], 0.0
        load = start
        passed = (p90 := p90_at(load)) <= SLO
        probes.append((load, p90))
        step = 1 + precision if passed else 1 / (1 + precision)
        while len(probes) < 12:
            if passed:
                capacity = max(capacity, load)
            elif capacity > 0:
                break
            load *= step
            passed = (p90 := p90_at(load)) <= SLO
            probes.append((load, p90))
            if passed and step < 1:
                capacity = load
                break
    return {
        "workload": workload,
        "seed": seed,
        "scheduler": on,
        "capacity": capacity,
        "probes": [list(p) for p in probes],
    }


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "requests", "completed", "failed", "shed", "ttft_p50", "ttft_p90", "ttft_p99",
        "goodput_rps", "goodput_share", "router_wait_p90", "shed_answer_max_s", "hit_ratio",
        "wall_s",
    )  # fmt: skip
    return {k: summary[k] for k in keys}


def _overload(job: tuple[str, float, float, bool]) -> dict[str, Any]:
    workload, multiple, base, on = job
    scheduler = ADMISSION_SCHEDULER if on else None
    cfg = _config(workload, base * multiple, scheduler)
    run = simulate_policy(trace_for(workload), "cost", cfg)
    return {"workload": workload, "multiple": multiple, "load": base * multiple, "scheduler": on,
            **_figures(run.summary)}  # fmt: skip


def fairness_trace(flood_load: float) -> tuple[Trace, Trace]:
    """(both tenants merged, the small tenant alone), in the flood's time frame."""
    flood = multi_turn(MultiTurnConfig(seed=1))
    small_all = multi_turn(MultiTurnConfig(seed=2))
    sessions = sorted({r.session or "" for r in small_all.requests})
    # Every 8th conversation of seed 2: ~1/8 of its requests, ~10% of the merged trace.
    keep = set(sessions[::8])
    span_flood = flood.requests[-1].timestamp / flood_load
    span_small = small_all.requests[-1].timestamp or 1.0
    stretch = span_flood / span_small  # the small tenant spans the same wall time, at load 1

    def small(r: TraceRequest) -> TraceRequest:
        return replace(r, timestamp=r.timestamp * stretch, session=f"small:{r.session}")

    def big(r: TraceRequest) -> TraceRequest:
        return replace(r, timestamp=r.timestamp / flood_load, session=f"flood:{r.session}")

    mine = [small(r) for r in small_all.requests if (r.session or "") in keep]
    merged = sorted([*mine, *(big(r) for r in flood.requests)], key=lambda r: r.timestamp)
    both = Trace(
        name="fairness",
        block_size=flood.block_size,
        requests=tuple(replace(r, index=i) for i, r in enumerate(merged)),
    )
    alone = Trace(
        name="fairness-solo",
        block_size=flood.block_size,
        requests=tuple(replace(r, index=i) for i, r in enumerate(mine)),
    )
    return both, alone


def _tenant(r: TraceRequest) -> str:
    return (r.session or "").split(":", 1)[0]


def _fairness(job: tuple[str, float, bool, float | None]) -> dict[str, Any]:
    which, flood_load, on, reserve = job
    both, alone = fairness_trace(flood_load)
    trace = both if which == "both" else alone
    scheduler = ADMISSION_SCHEDULER if on else None
    if on and reserve is not None:
        scheduler = replace(ADMISSION_SCHEDULER, engine_priority=True, reserve=reserve)
    cfg = SimConfig(profiles=("llama3-8b-h100",) * 8, load=1.0, scheduler=scheduler,
                    goodput_slo_s=SLO)  # fmt: skip
    run = simulate_policy(trace, "cost", cfg, tenant_of=_tenant)
    tenants = {name: _figures(s) for name, s in run.summary["tenants"].items()}
    return {"trace": which, "scheduler": on, "engine_priority_reserve": reserve,
            "tenants": tenants}  # fmt: skip


def _map(pool: ProcessPoolExecutor, fn: Callable[[Any], dict[str, Any]], jobs: list[Any],
         label: str) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for i, result in enumerate(pool.map(fn, jobs), 1):
        print(f"  {label} {i}/{len(jobs)}: {json.dumps(result)[:160]}", flush=True)
        out.append(result)
    return out


def _oracle(workload: str) -> float | None:
    path = RESULTS / f"sim_{workload}.json"
    if not path.exists():
        return None
    value = json.loads(path.read_text())["capacity"].get("oracle", {}).get("max_load")
    return None if value is None else float(value)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    rows = doc.get("capacity", [])
    names = sorted({(r["workload"], r["seed"]) for r in rows})
    if names:
        x = range(len(names))
        off = [next(r["capacity"] for r in rows if (r["workload"], r["seed"]) == n
                    and not r["scheduler"]) for n in names]  # fmt: skip
        on = [next(r["capacity"] for r in rows if (r["workload"], r["seed"]) == n
                   and r["scheduler"]) for n in names]  # fmt: skip
        ratio = [b / a if a else 0.0 for a, b in zip(off, on, strict=True)]
        ax1.bar(list(x), ratio, color="tab:blue")
        ax1.axhline(1.0, color="grey", linewidth=0.8)
        ax1.axhline(0.98, color="red", linewidth=0.6, linestyle=":")
        ax1.set_xticks(list(x), [f"{w}\nseed {s}" for w, s in names], fontsize=6, rotation=30)
        ax1.set_ylabel("capacity with / without the scheduler")
        ax1.set_title("(a) capacity at p90 TTFT <= 2 s, cost policy", fontsize=9)
    over = doc.get("overload", [])
    for workload in sorted({r["workload"] for r in over}):
        for on, style in ((False, ":"), (True, "-")):
            pts = sorted((r["multiple"], r["goodput_rps"]) for r in over
                         if r["workload"] == workload and r["scheduler"] == on)  # fmt: skip
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                         label=f"{workload} {'on' if on else 'off'}")  # fmt: skip
    ax2.set_xlabel("load (x cost's capacity without the scheduler)")
    ax2.set_ylabel("goodput (req/s with TTFT <= 2 s)")
    ax2.set_title("(b) goodput past capacity (solid: scheduler on)", fontsize=9)
    ax2.legend(fontsize=6)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tables(doc: dict[str, Any]) -> str:
    """The README's markdown tables, from the committed JSON (figures are never typed)."""
    out: list[str] = []
    caps = doc.get("capacity", [])
    if caps:
        out += ["| workload | seed | cost | cost + scheduler | ratio | oracle (sim_*.json) |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for w, seed in sorted({(r["workload"], r["seed"]) for r in caps}):
            rows = {r["scheduler"]: r for r in caps if (r["workload"], r["seed"]) == (w, seed)}
            if False not in rows or True not in rows:
                continue
            off, on = rows[False]["capacity"], rows[True]["capacity"]
            oracle = rows[False].get("oracle") if seed == 1 else None
            shown = f"{oracle:.2f}" if oracle else "-"
            out.append(f"| {w} | {seed} | {off:.2f} | {on:.2f} | {on / off:.3f}x | {shown} |")
    over = doc.get("overload", [])
    if over:
        out += ["", "| workload | x capacity | scheduler | goodput req/s | within 2 s | shed | "
                "p90 TTFT admitted | p99 | router wait p90 | slowest shed answer |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(over, key=lambda r: (r["workload"], r["multiple"], r["scheduler"])):
            out.append(
                f"| {r['workload']} | {r['multiple']:g} | {'on' if r['scheduler'] else 'off'} | "
                f"{r['goodput_rps']:.2f} | {r['goodput_share']:.3f} | {r['shed']} | "
                f"{r['ttft_p90']:.2f} | {r['ttft_p99']:.2f} | {r['router_wait_p90']:.2f} | "
                f"{r['shed_answer_max_s'] * 1000:.0f} ms |"
            )
    fair = doc.get("fairness", [])
    if fair:
        out += ["", "| run | scheduler | engine priority, kept | tenant | requests | shed | "
                "p90 TTFT | goodput share |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in fair:
            reserve = r.get("engine_priority_reserve")
            kept = "-" if reserve is None else f"on, {reserve:g}"
            for tenant, f in r["tenants"].items():
                out.append(
                    f"| {r['trace']} | {'on' if r['scheduler'] else 'off'} | {kept} | {tenant} | "
                    f"{f['requests']} | {f['shed']} | {f['ttft_p90']:.3f} | "
                    f"{f['goodput_share']:.3f} |"
                )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="a,b,c", help="which measurements (a, b, c)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="other seeds for (a)")
    p.add_argument("--precision", type=float, default=0.03, help="capacity search precision")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=RESULTS / "scheduler.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "scheduler.png")
    p.add_argument("--tables", action="store_true", help="print the tables of --json and stop")
    args = p.parse_args(argv)
    if args.tables:
        print(tables(json.loads(args.json.read_text())))
        return 0
    parts = set(args.parts.split(","))
    workloads = [w for w in args.workloads.split(",") if w]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "machine": "shared 2-core CPU box, no GPU; GPUs are the simulated engine's",
        "pool": "8 x llama3-8b-h100 (conv-hicache: llama3-8b-h100-hicache)",
        "slo_ttft_p90_s": SLO,
        "capacity_scheduler": repr(CAPACITY_SCHEDULER),
        "admission_scheduler": repr(ADMISSION_SCHEDULER),
        "fairness_reserves": list(RESERVES),
        "precision": args.precision,
    }

    def save() -> None:  # after each part, so a cut-short run still leaves its figures
        doc["wall_s"] = time.perf_counter() - started
        write_json(args.json, doc)

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        if "a" in parts or "b" in parts:
            starts = {w: 2.5 if w.startswith("conv") else 8.0 for w in workloads}
            jobs = [(w, 1, False, args.precision, starts[w]) for w in workloads]
            doc["capacity"] = _map(pool, _capacity, jobs, "capacity")
            if "a" in parts:
                jobs = [(r["workload"], 1, True, args.precision, r["capacity"])
                        for r in doc["capacity"]]  # fmt: skip
                doc["capacity"] += _map(pool, _capacity, jobs, "capacity (scheduler)")
            for row in doc["capacity"]:
                row["oracle"] = _oracle(row["workload"])
            save()
        if "b" in parts:
            base = {r["workload"]: r["capacity"] for r in doc["capacity"]
                    if r["seed"] == 1 and not r["scheduler"]}  # fmt: skip
            jobs = [(w, m, base[w], on) for w in workloads for m in (1.0, 1.5, 2.0)
                    for on in (False, True)]  # fmt: skip
            doc["overload"] = _map(pool, _overload, jobs, "overload")
            save()
        if "c" in parts:
            base = next((r["capacity"] for r in doc.get("capacity", [])
                         if r["workload"] == "multi-turn" and r["seed"] == 1
                         and not r["scheduler"]), 9.935)  # fmt: skip
            doc["fairness_flood_load"] = 3 * base
            jobs = [(which, 3 * base, on, None) for which in ("solo", "both")
                    for on in (False, True)]  # fmt: skip
            jobs += [("both", 3 * base, True, r) for r in RESERVES]
            doc["fairness"] = _map(pool, _fairness, jobs, "fairness")
            save()
        if "a" in parts and seeds:
            jobs = [(w, s, False, args.precision, 8.0) for w in ("multi-turn", "shared-prefix")
                    if w in workloads for s in seeds]  # fmt: skip
            offs = _map(pool, _capacity, jobs, "capacity (other seeds)")
            jobs = [(r["workload"], r["seed"], True, args.precision, r["capacity"]) for r in offs]
            doc["capacity"] += offs + _map(pool, _capacity, jobs, "capacity (seeds, scheduler)")
            save()
    save()
    plot(doc, args.plot)
    print(f"wrote {args.json} and {args.plot} in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
