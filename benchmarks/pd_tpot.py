"""Where TPOT comes from in a PD pool, and whether the decode choice can lower it (virtual time).

pd_live.py's window (multi-turn seed 1, 240 s + 120 s, 2 prefill + 2 decode llama3-8b-h100)
at a ladder of loads, each routed by

  pair                       ours: the paired price (decode side: (1 + N) x the step at the
                             decode server's batch KV with the request joined, and KV room),
                             holding requests in the router while no decode server has room
                             (released by wait per token of room, router/core/pd.py)
  pair:no-hold               the same price, every request sent at once (to wait for room in
                             its decode server's first-come-first-served queue)
  cache_aware+power_of_two   SMG's PD defaults as the simulator plays them (fresh request
                             counts; SMG 1.13 itself reads a load snapshot polled every 10 s)
  cache_aware+round_robin    a decode choice that ignores load
  cache_aware+random         a decode choice that knows nothing
  pair:slo-tpot=S            ours with `--slo-tpot S`: a request waits in the router while its
                             predicted step on every decode server passes S (the trade of
                             TTFT for TPOT an operator with a TPOT SLO asks for)

and, per router seed, reports p90 TTFT and where it went (`ttft_split`: the mean room-wait,
prefill, transfer and decode-wait phases over all requests and over the slowest tenth; the
decode server preallocates KV before the prefill may start, as SGLang's), TPOT p50 / p90 /
p99 / max and mean (TPOT: a
request's mean gap between output tokens after its first, as the client measures it), and,
sampled at every arrival on every decode server, the share of samples where requests were
waiting for KV room and the decode step at the KV the server's batch held then.

A decode step reads the weights and the batch's KV: step = a + c x batch KV (the profile's
roofline, backends/sim/perf.py), so no TPOT can exceed the step with the KV pool full
(`ceiling` in the JSON). A decode server admits a request only when its prompt and whole output
fit (reserved up front, as SGLang's decode server preallocates), so once requests queue for
room the batch holds the pool less the reserved output not yet written, and every request
decoding there runs at about the same step, whichever router sent it.

Results: benchmarks/results/pd_tpot.json and .png. Virtual time: the shared 2-core box where
the figures were taken changes only the wall time (~20 s).

Run:  python benchmarks/pd_tpot.py
      python benchmarks/pd_tpot.py --table
      python benchmarks/pd_tpot.py --ttft-table
      python benchmarks/pd_tpot.py --ttft-ladder
      python benchmarks/pd_tpot.py --trace-seed 2 --loads 2.8,3.2,3.6,4 --seeds 1 \
          --routers pair,pair:slo-tpot=0.025,cache_aware+power_of_two \
          --out benchmarks/results/pd_tpot_seed2.json        (an unseen window)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.sim.engine import Engine
from backends.sim.perf import get_profile
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.metrics import percentile, write_json
from router.replay.pd_simulate import PDSimConfig, simulate_pd, tpot_slo_of

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "llama3-8b-h100"
NO_HOLD = "pair:no-hold"
ROUTERS = (
    "pair",
    NO_HOLD,
    "cache_aware+power_of_two",
    "cache_aware+round_robin",
    "cache_aware+random",
    "pair:slo-tpot=0.025",
    "pair:slo-tpot=0.024",
)
LOADS = (1.0, 1.5, 2.0, 2.5, 2.8, 3.0, 3.084, 3.2, 3.5, 4.0)


def measure(router: str, cfg: PDSimConfig, window: Any) -> dict[str, Any]:
    """One run: latency figures and what the decode servers looked like at each arrival."""
    profile = cfg.resolved_profile
    waiting: list[bool] = []
    steps_queued: list[float] = []
    steps: list[float] = []
    running: list[int] = []
    reserved: list[float] = []

    def probe(now: float, engines: Mapping[str, Engine], for_room: Mapping[str, int]) -> None:
        for bid, engine in engines.items():
            load = engine.load()
            queued = load.waiting > 0 or for_room[bid] > 0
            waiting.append(queued)
            running.append(load.running)
            reserved.append(load.kv_used_tokens / load.kv_capacity_tokens)
            if load.running:
                step = profile.decode_step_time(1, engine.batch_kv_tokens())
                steps.append(step)
                if queued:
                    steps_queued.append(step)

    slo = tpot_slo_of(router)
    if router == NO_HOLD:
        run = simulate_pd(window, "pair", dataclasses.replace(cfg, room_hold=False), probe=probe)
    elif slo is not None:
        run = simulate_pd(window, "pair", dataclasses.replace(cfg, tpot_slo_s=slo), probe=probe)
    else:
        run = simulate_pd(window, router, cfg, probe=probe)
    tpots = sorted(o.tpot for o in run.outcomes if o.tpot is not None)
    return {
        "router": router,
        "load": cfg.load,
        "seed": cfg.seed,
        "failed": run.summary["failed"],
        "ttft_p90": run.summary["ttft_p90"],
        "tpot_mean": run.summary["tpot_mean"],
        **{f"tpot_p{q}": percentile(tpots, q) for q in (50, 90, 99)},
        "tpot_max": tpots[-1] if tpots else None,
        "decode_queued_share": sum(waiting) / len(waiting) if waiting else 0.0,
        "decode_kv_reserved_mean": statistics.fmean(reserved) if reserved else 0.0,
        "decode_running_max": max(running, default=0),
        "decode_step_mean": statistics.fmean(steps) if steps else None,
        "decode_step_max": max(steps, default=None),
        "decode_step_mean_when_queued": statistics.fmean(steps_queued) if steps_queued else None,
        "ttft_split": run.summary["ttft_split"],
    }


def ceiling() -> dict[str, float]:
    """The roofline's decode step: a + c x batch KV, and its value with the KV pool full."""
    profile = get_profile(PROFILE)
    a, c = profile.decode_coefficients()
    full = profile.kv_capacity_tokens
    return {
        "step_s_empty_batch_kv": a,
        "s_per_kv_token": c,
        "kv_capacity_tokens": full,
        "step_s_full_kv": profile.decode_step_time(1, full),
    }


def _spread(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r[key] is not None]
    return max(values) / min(values) - 1.0


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per load: each router's p90 TPOT (mean over seeds) and the spread of all runs there."""
    out = []
    for load in sorted({r["load"] for r in rows}):
        at = [r for r in rows if r["load"] == load]
        by_router = {
            router: statistics.fmean(r["tpot_p90"] for r in at if r["router"] == router)
            for router in dict.fromkeys(r["router"] for r in at)
        }
        out.append(
            {
                "load": load,
                "tpot_p90_by_router": by_router,
                # every router's runs but those under a TPOT SLO (which sets its own ceiling)
                "tpot_p90_spread_all_runs": _spread(
                    [r for r in at if tpot_slo_of(r["router"]) is None], "tpot_p90"
                ),
                "decode_queued_share_mean": statistics.fmean(
                    r["decode_queued_share"] for r in at if tpot_slo_of(r["router"]) is None
                ),
            }
        )
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    rows = doc["runs"]
    for router in doc["routers"]:
        loads = sorted({r["load"] for r in rows if r["router"] == router})

        def mean(key: str, load: float, router: str = router) -> float:
            vals = [r[key] for r in rows if r["router"] == router and r["load"] == load]
            return statistics.fmean(vals)

        ax1.plot(loads, [mean("tpot_p90", x) * 1000 for x in loads], marker="o", ms=3, label=router)
        ax2.plot(loads, [mean("decode_queued_share", x) for x in loads], marker="o", ms=3)
    full = doc["ceiling"]["step_s_full_kv"] * 1000
    ax1.axhline(full, color="grey", linestyle=":", linewidth=1)
    ax1.text(min(doc["loads"]), full, f" step with the KV pool full: {full:.2f} ms", fontsize=7,
             va="bottom")  # fmt: skip
    ax1.axvline(doc["live_load"], color="grey", linestyle="--", linewidth=0.8)
    ax2.axvline(doc["live_load"], color="grey", linestyle="--", linewidth=0.8)
    ax1.set_ylabel("p90 TPOT (ms)")
    ax2.set_ylabel("requests waiting for decode KV room\n(share of decode servers at arrivals)")
    for ax in (ax1, ax2):
        ax.set_xlabel("load (x the trace's arrival rate); dashed: pd_live.py's load")
        ax.grid(True, alpha=0.25)
    ax1.legend(fontsize=7)
    fig.suptitle(
        f"{doc['window']['trace']}, PD {doc['pd']['prefill']}P+{doc['pd']['decode']}D x "
        f"{doc['profile']}: where TPOT comes from (virtual time)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(doc: dict[str, Any]) -> str:
    """docs/pd.md's rows, read from the JSON (never typed by hand)."""
    routers = doc["routers"]
    head = " | ".join(f"{r} ms" for r in routers)
    rows = [
        f"| load | {head} | spread, all runs | decode queued |",
        "|---" * (len(routers) + 3) + "|",
    ]
    for s in doc["summary"]:
        cells = " | ".join(f"{s['tpot_p90_by_router'][r] * 1000:.3f}" for r in routers)
        rows.append(
            f"| {s['load']:g} | {cells} | {s['tpot_p90_spread_all_runs'] * 100:.2f}% | "
            f"{s['decode_queued_share_mean']:.2f} |"
        )
    return "\n".join(rows)


def ttft_ladder(doc: dict[str, Any]) -> str:
    """p90 TTFT per load and router (seed means), and the pair's over SMG's rule."""
    routers = doc["routers"]
    rows = [
        "| load | " + " | ".join(f"{r} s" for r in routers) + " | pair / SMG's rule |",
        "|---" * (len(routers) + 2) + "|",
    ]
    for load in doc["loads"]:
        p90 = {
            r: statistics.fmean(
                x["ttft_p90"] for x in doc["runs"] if x["load"] == load and x["router"] == r
            )
            for r in routers
        }
        cells = " | ".join(f"{p90[r]:.3f}" for r in routers)
        ratio = p90["pair"] / p90["cache_aware+power_of_two"]
        rows.append(f"| {load:g} | {cells} | {ratio:.2f} |")
    return "\n".join(rows)


def ttft_table(doc: dict[str, Any], loads: tuple[float, ...] = (2.5, 3.084)) -> str:
    """Where p90 TTFT goes, per router: the mean phases of the slowest tenth (seed means)."""
    phases = ("ttft", "room_wait", "prefill", "transfer", "decode_wait")
    rows = [
        "| load | router | p90 TTFT s | slowest 10%: TTFT | room wait | prefill | transfer "
        "| decode wait | all: room wait | prefill |",
        "|---" * 10 + "|",
    ]
    for load in loads:
        for router in doc["routers"]:
            at = [r for r in doc["runs"] if r["load"] == load and r["router"] == router]
            if not at:
                continue

            def mean(part: str, key: str, at: list[dict[str, Any]] = at) -> float:
                return statistics.fmean(r["ttft_split"][part][key] for r in at)

            p90 = statistics.fmean(r["ttft_p90"] for r in at)
            tail = " | ".join(f"{mean('slowest_10pct', k):.3f}" for k in phases)
            rows.append(
                f"| {load:g} | {router} | {p90:.3f} | {tail} | {mean('mean', 'room_wait'):.3f} "
                f"| {mean('mean', 'prefill'):.3f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS))
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--seeds", type=int, default=3, help="router seeds per cell (default 3)")
    parser.add_argument(
        "--trace-seed",
        type=int,
        default=1,
        help="the multi-turn trace's seed (default 1, pd_live.py's; others: unseen windows)",
    )
    parser.add_argument("--live-load", type=float, default=3.084, help="marked on the plot")
    parser.add_argument("--out", type=Path, default=RESULTS / "pd_tpot.json")
    parser.add_argument("--table", action="store_true", help="print docs/pd.md's rows and stop")
    parser.add_argument(
        "--ttft-table", action="store_true", help="print docs/pd.md's TTFT-split rows and stop"
    )
    parser.add_argument(
        "--ttft-ladder", action="store_true", help="print docs/pd.md's p90 TTFT rows and stop"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    if args.ttft_table:
        print(ttft_table(json.loads(args.out.read_text())))
        return 0
    if args.ttft_ladder:
        print(ttft_ladder(json.loads(args.out.read_text())))
        return 0
    loads = [float(x) for x in args.loads.split(",")]
    routers = args.routers.split(",")
    window = multi_turn(MultiTurnConfig(seed=args.trace_seed)).window(240.0, 120.0)
    base = PDSimConfig(prefill=2, decode=2, profile=PROFILE)
    rows = []
    for load in loads:
        for router in routers:
            for seed in range(args.seeds):
                cfg = dataclasses.replace(base, load=load, seed=seed)
                rows.append(measure(router, cfg, window))
            at = [r for r in rows if r["load"] == load and r["router"] == router]
            print(
                f"load {load:g} {router}: p90 TPOT "
                + " / ".join(f"{r['tpot_p90'] * 1000:.3f}" for r in at)
                + f" ms, p90 TTFT {statistics.fmean(r['ttft_p90'] for r in at):.3f} s, decode "
                f"queued {statistics.fmean(r['decode_queued_share'] for r in at):.2f}",
                flush=True,
            )
    doc = {
        "window": {
            "trace": f"multi_turn seed {args.trace_seed}",
            "start": 240.0,
            "duration": 120.0,
        },
        "profile": PROFILE,
        "pd": {"prefill": base.prefill, "decode": base.decode},
        "loads": loads,
        "routers": routers,
        "seeds": args.seeds,
        "live_load": args.live_load,
        "machine": "shared 2-core box; virtual time (the box changes only the wall time)",
        "command": "python benchmarks/pd_tpot.py " + " ".join(argv or sys.argv[1:]),
        "ceiling": ceiling(),
        "summary": summarise(rows),
        "runs": rows,
    }
    write_json(args.out, doc)
    plot(doc, args.out.with_suffix(".png"))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
