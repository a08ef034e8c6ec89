"""The router-side scheduler (router/core/scheduler.py) in the simulated pool: does it pay?

Three measurements, 8 x llama3-8b-h100 (conv-hicache: the HiCache profile), SLO p90 TTFT 2 s:

(a) capacity: the highest load whose p90 TTFT stays within the SLO with no request failed
    (a shed request is a failed one), `cost` without and with the scheduler, on the four
    workloads of sim_compare.py and on seeds 2-4 of the generated ones. Both sides walk the
    same 1% grid (anchored at a coarse 3% search without the scheduler): the highest grid load
    that passes with the next one up failing. The oracle's capacity is read from the committed
    sim_<workload>.json (bisection to 5%), not rerun.
(b) overload: goodput (requests with TTFT <= 2 s per second of arrivals), shed share and p90
    TTFT of the admitted requests at 1x, 1.5x and 2x the capacity of `cost` without the
    scheduler; with the scheduler, deadline admission at 2 s sheds on arrival. Then throughput
    admission's headroom swept (1, 1.25, 1.5, 2, off) at 1x and 2x on multi-turn and
    shared-prefix.
(c) fairness: a small tenant (every 8th conversation of multi-turn seeds 2, 3 and 4, ~10% of
    requests) beside a flooding one (multi-turn seed 1 at 3x cost's capacity): the small
    tenant's p90 TTFT against its figure alone on the same pool, and the flood's goodput,
    without the scheduler, with it without isolation, with engine priorities (the engines run
    SGLang's --enable-priority-scheduling), with isolation (the default), and with both. The
    same at 1x (no flood: the big tenant at capacity) with and without isolation, to show
    what isolation costs where there is nothing to isolate from.

Run:  flock /tmp/prefix-router-heavy.lock python benchmarks/scheduler.py   (~8 min, 2 cores)
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
# The small tenant's conversations in (c) come from these seeds of the multi-turn generator.
SEEDS_FAIRNESS = (2, 3, 4)
# Capacity runs: no admission (a shed request would fail the run), order by the SLO.
CAPACITY_SCHEDULER = SchedulerConfig(late_last_s=SLO)
# Overload runs: admission by the 2 s deadline as well.
ADMISSION_SCHEDULER = SchedulerConfig(slo_ttft_s=SLO)
# The flood's unit: cost's capacity on multi-turn seed 1 without the scheduler (the committed
# figure; fixed so that part (c) does not move with part (a)'s grid).
FAIRNESS_BASE = 9.934862496587872


def trace_for(workload: str, seed: int = 1) -> Trace:
    if workload.startswith("conv"):
        return load_trace(bundled("conversation"))
    if workload == "multi-turn":
        return multi_turn(MultiTurnConfig(seed=seed))
    return shared_prefix(SharedPrefixConfig(seed=seed))


def _config(workload: str, load: float, scheduler: SchedulerConfig | None) -> SimConfig:
    profile = PROFILES.get(workload, "llama3-8b-h100")
    return SimConfig(profiles=(profile,) * 8, load=load, scheduler=scheduler, goodput_slo_s=SLO)


def _walk(p90_at: Callable[[float], float], start: float, step: float,
          probes: list[tuple[float, float]]) -> float:  # fmt: skip
    """The highest load of the grid start * step**k (k an integer) that meets the SLO with the
    next one up failing: up from `start` while it passes, else down to the first that passes
    (0.0 if none within 24 steps). Both sides of the comparison walk the same grid."""
    load = start
    passed = (p90 := p90_at(load)) <= SLO
    probes.append((load, p90))
    going_up = passed
    for _ in range(24):
        nxt = load * step if going_up else load / step
        ok = (p90 := p90_at(nxt)) <= SLO
        probes.append((nxt, p90))
        if going_up and not ok:
            return load
        if not going_up and ok:
            return nxt
        load = nxt
    return load if going_up else 0.0


def _capacity(job: tuple[str, int, bool, float, float, float]) -> dict[str, Any]:
    """One side's capacity on the grid anchor * (1 + fine)**k that both sides share.

    Without the scheduler, `start` is where a coarse search (doubling, then bisection to
    `precision`) begins, and its answer is the grid's anchor; with it, `start` is that anchor.
    The coarse search alone let the two sides land on different grids: conv-h100 read 0.971x
    where on one 1% grid both sides pass at 2.6107 and fail at 2.6368.
    """
    workload, seed, on, precision, fine, start = job
    trace = trace_for(workload, seed)
    scheduler = CAPACITY_SCHEDULER if on else None

    def p90_at(load: float) -> float:
        run = simulate_policy(trace, "cost", _config(workload, load, scheduler))
        return capacity_p90(run.summary)

    probes: list[tuple[float, float]] = []
    coarse = None
    if not on:
        found = find_capacity(p90_at, slo=SLO, start=start, precision=precision)
        probes, coarse = list(found.probes), found.max_load
        start = coarse
    capacity = _walk(p90_at, start, 1 + fine, probes)
    return {
        "workload": workload,
        "seed": seed,
        "scheduler": on,
        "capacity": capacity,
        "grid_anchor": start,
        "grid_step": 1 + fine,
        "coarse_capacity": coarse,
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


# Throughput admission's headroom (x the pool's full-batch rate), swept at 1x and 2x on the two
# decode-heavy workloads; None: throughput admission off.
HEADROOMS: tuple[float | None, ...] = (1.0, 1.25, 1.5, 2.0, None)


def _headroom(job: tuple[str, float, float, float | None]) -> dict[str, Any]:
    workload, multiple, base, headroom = job
    scheduler = (
        replace(ADMISSION_SCHEDULER, throughput_admission=False)
        if headroom is None
        else replace(ADMISSION_SCHEDULER, throughput_headroom=headroom)
    )
    cfg = _config(workload, base * multiple, scheduler)
    run = simulate_policy(trace_for(workload), "cost", cfg)
    return {"workload": workload, "multiple": multiple, "headroom": headroom,
            **_figures(run.summary)}  # fmt: skip


def fairness_trace(flood_load: float, small_seed: int = 2) -> tuple[Trace, Trace]:
    """(both tenants merged, the small tenant alone), in the flood's time frame."""
    flood = multi_turn(MultiTurnConfig(seed=1))
    small_all = multi_turn(MultiTurnConfig(seed=small_seed))
    sessions = sorted({r.session or "" for r in small_all.requests})
    # Every 8th conversation: ~1/8 of its requests, ~10% of the merged trace (at 3x).
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


# Fairness variants: no scheduler; the scheduler without isolation, with engine priority,
# with isolation (its default), with both.
FAIRNESS_VARIANTS: dict[str, SchedulerConfig | None] = {
    "off": None,
    "no isolation": replace(ADMISSION_SCHEDULER, isolation=False),
    "engine priority": replace(ADMISSION_SCHEDULER, isolation=False, engine_priority=True),
    "isolation": ADMISSION_SCHEDULER,
    "isolation + engine priority": replace(ADMISSION_SCHEDULER, engine_priority=True),
}


def _fairness(job: tuple[str, float, int, str]) -> dict[str, Any]:
    which, flood_multiple, small_seed, variant = job
    both, alone = fairness_trace(flood_multiple * FAIRNESS_BASE, small_seed)
    trace = both if which == "both" else alone
    cfg = SimConfig(profiles=("llama3-8b-h100",) * 8, load=1.0,
                    scheduler=FAIRNESS_VARIANTS[variant], goodput_slo_s=SLO)  # fmt: skip
    run = simulate_policy(trace, "cost", cfg, tenant_of=_tenant)
    tenants = {name: _figures(s) for name, s in run.summary["tenants"].items()}
    return {"trace": which, "flood_multiple": flood_multiple, "small_seed": small_seed,
            "variant": variant, "tenants": tenants}  # fmt: skip


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
        for sched_on, style in ((False, ":"), (True, "-")):
            pts = sorted((r["multiple"], r["goodput_rps"]) for r in over
                         if r["workload"] == workload and r["scheduler"] == sched_on)  # fmt: skip
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                         label=f"{workload} {'on' if sched_on else 'off'}")  # fmt: skip
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
    sweep = doc.get("headroom", [])
    if sweep:
        out += ["", "| workload | headroom | goodput 1x | goodput 2x | 2x / 1x | shed 1x | "
                "p90 TTFT admitted 2x |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for w in sorted({r["workload"] for r in sweep}):
            for h in HEADROOMS:
                at = {r["multiple"]: r for r in sweep if r["workload"] == w and r["headroom"] == h}
                if 1.0 not in at or 2.0 not in at:
                    continue
                one, two = at[1.0], at[2.0]
                out.append(
                    f"| {w} | {'off' if h is None else f'{h:g}'} | {one['goodput_rps']:.2f} | "
                    f"{two['goodput_rps']:.2f} | {two['goodput_rps'] / one['goodput_rps']:.3f} | "
                    f"{one['shed']} | {two['ttft_p90']:.2f} |"
                )
    fair = doc.get("fairness", [])
    if fair:
        solo = {(r["small_seed"], r["flood_multiple"]): r["tenants"]["small"]["ttft_p90"]
                for r in fair if r["trace"] == "solo"}  # fmt: skip
        out += ["", "| other tenant | small seed | scheduler | small p90 TTFT | x solo | "
                "small shed | flood p90 TTFT | flood goodput req/s | flood shed |",
                "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in fair:
            if r["trace"] == "solo":
                continue
            small, flood = r["tenants"]["small"], r["tenants"]["flood"]
            key = (r["small_seed"], r["flood_multiple"])
            ratio = small["ttft_p90"] / solo[key] if key in solo else 0.0
            out.append(
                f"| {r['flood_multiple']:g}x capacity | {r['small_seed']} | {r['variant']} | "
                f"{small['ttft_p90']:.3f} | {ratio:.2f}x | {small['shed']} | "
                f"{flood['ttft_p90']:.2f} | {flood['goodput_rps']:.2f} | {flood['shed']} |"
            )
        out += ["", "Small tenant alone (scheduler on), p90 TTFT: " + ", ".join(
            f"seed {k[0]} at the {k[1]:g}x run's rate {v:.3f} s"
            for k, v in sorted(solo.items()))]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="a,b,c", help="which measurements (a, b, c)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="other seeds for (a)")
    p.add_argument("--precision", type=float, default=0.03,
                   help="coarse capacity search precision (anchors the grid)")  # fmt: skip
    p.add_argument("--fine", type=float, default=0.01,
                   help="step of the capacity grid both sides walk")  # fmt: skip
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
        "fairness_variants": {k: repr(v) for k, v in FAIRNESS_VARIANTS.items()},
        "precision": args.precision,
        "grid_step": 1 + args.fine,
    }

    def save() -> None:  # after each part, so a cut-short run still leaves its figures
        doc["wall_s"] = time.perf_counter() - started
        write_json(args.json, doc)

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        if "a" in parts or "b" in parts:
            starts = {w: 2.5 if w.startswith("conv") else 8.0 for w in workloads}
            jobs: list[Any] = [(w, 1, False, args.precision, args.fine, starts[w])
                               for w in workloads]  # fmt: skip
            doc["capacity"] = _map(pool, _capacity, jobs, "capacity")
            if "a" in parts:
                jobs = [(r["workload"], 1, True, args.precision, args.fine, r["grid_anchor"])
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
            jobs = [(w, m, base[w], h) for w in ("multi-turn", "shared-prefix") if w in base
                    for m in (1.0, 2.0) for h in HEADROOMS]  # fmt: skip
            doc["headroom"] = _map(pool, _headroom, jobs, "headroom")
            save()
        if "c" in parts:
            doc["fairness_base_load"] = FAIRNESS_BASE
            jobs = [("solo", m, seed, "isolation") for m in (3.0, 1.0) for seed in SEEDS_FAIRNESS]
            jobs += [("both", 3.0, seed, v) for seed in SEEDS_FAIRNESS for v in FAIRNESS_VARIANTS]
            # No flood (the other tenant at 1x capacity): isolation must cost nothing there.
            jobs += [("both", 1.0, seed, v) for seed in SEEDS_FAIRNESS
                     for v in ("no isolation", "isolation")]  # fmt: skip
            doc["fairness"] = _map(pool, _fairness, jobs, "fairness")
            save()
        if "a" in parts and seeds:
            jobs = [(w, s, False, args.precision, args.fine, 8.0)
                    for w in ("multi-turn", "shared-prefix")
                    if w in workloads for s in seeds]  # fmt: skip
            offs = _map(pool, _capacity, jobs, "capacity (other seeds)")
            jobs = [(r["workload"], r["seed"], True, args.precision, args.fine, r["grid_anchor"])
                    for r in offs]  # fmt: skip
            doc["capacity"] += offs + _map(pool, _capacity, jobs, "capacity (seeds, scheduler)")
            save()
    save()
    plot(doc, args.plot)
    print(f"wrote {args.json} and {args.plot} in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
