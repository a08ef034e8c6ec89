"""Live PD comparison over real HTTP: our PD router against SMG 1.13 in PD mode.

One window (the multi-turn trace's 240 s + 120 s, llama3-8b-h100) replayed open-loop through
each target, each on a fresh pool of simulated PD servers (`prefix-router sim --mode prefill`
with bootstrap ports, `--mode decode`; backends/sim/pd_server.py):

  pair                       ours: `serve --prefill URL PORT ... --decode URL ...`, the paired
                             price (prefill TTFT + KV transfer + N x decode TG)
  smg:cache_aware+power_of_two
                             `smg launch --pd-disaggregation --prefill URL PORT ... --decode URL
                             ... --prefill-policy cache_aware --decode-policy power_of_two`
  ours:cache_aware+power_of_two (optional, --targets): our proxy with SMG's pair of policies

The load is SMG's capacity as the simulator sees it: the highest load at which
`cache_aware+power_of_two` keeps p90 TTFT <= the SLO on this window (find_capacity, to
`--precision`), or `--load`. Our simulated cache_aware is sglang-router 0.3.2's rule, not SMG
1.13's own: the live runs are the check. Figures: p90 TTFT and p90 TPOT per target, failed
requests; checks: our p90 TTFT <= 0.7 x SMG's, our p90 TPOT <= SMG's, no failure.
Results: benchmarks/results/pd_live.json. Taken on a shared 2-core box.

Run:  python benchmarks/pd_live.py                       (~6 minutes)
      python benchmarks/pd_live.py --load 3 --targets pair,smg:cache_aware+power_of_two
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from router.replay.client import ReplayConfig, replay
from router.replay.compare import ProcessSet, _tail
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.metrics import summarize, write_json
from router.replay.pd_simulate import PDSimConfig, simulate_pd, tpot_p90
from router.replay.ports import free_port_block
from router.replay.simulate import capacity_p90, find_capacity
from router.replay.traces import Trace

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "llama3-8b-h100"
SMG_PAIR = "cache_aware+power_of_two"


def _router_argv(
    target: str, port: int, prefill: list[tuple[str, int]], decode: list[str], metrics_port: int
) -> list[str]:
    py = sys.executable
    if target.startswith("smg:"):
        ppolicy, dpolicy = target[4:].split("+")
        argv = [py, "-m", "smg", "launch", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--pd-disaggregation"]
        for url, boot in prefill:
            argv += ["--prefill", url, str(boot)]
        for url in decode:
            argv += ["--decode", url]
        argv += ["--prefill-policy", ppolicy, "--decode-policy", dpolicy, "--log-level", "warn"]
        argv += ["--worker-startup-check-interval", "1", "--prometheus-host", "127.0.0.1"]
        return [*argv, "--prometheus-port", str(metrics_port)]
    argv = [py, "-m", "router", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--profile", PROFILE, "--log-level", "WARNING"]
    for url, boot in prefill:
        argv += ["--prefill", url, str(boot)]
    for url in decode:
        argv += ["--decode", url]
    if target.startswith("ours:"):
        ppolicy, dpolicy = target[5:].split("+")
        argv += ["--prefill-policy", ppolicy, "--decode-policy", dpolicy]
    return argv


async def run_target(
    window: Trace, target: str, args: argparse.Namespace, load: float, logs: Path
) -> dict[str, Any]:
    procs = ProcessSet(logs)
    slug = target.replace(":", "-").replace("+", "-")
    p, d = args.prefill, args.decode
    try:
        base = free_port_block(2 * p + d + 2)
        purls = [f"http://127.0.0.1:{base + i}" for i in range(p)]
        boots = [base + p + i for i in range(p)]
        durls = [f"http://127.0.0.1:{base + 2 * p + i}" for i in range(d)]
        port = base + 2 * p + d
        common = ["--host", "127.0.0.1", "--profile", PROFILE, "--speedup", f"{args.speedup:g}"]
        common += ["--log-level", "warning"]
        py = sys.executable
        deadline = time.monotonic() + 90
        await procs.start_ready(
            f"{slug}-prefill",
            [py, "-m", "router", "sim", "--mode", "prefill", "--count", str(p), "--port",
             str(base), "--bootstrap-port", str(base + p), *common],
            [u + "/health" for u in purls], deadline,
        )  # fmt: skip
        await procs.start_ready(
            f"{slug}-decode",
            [py, "-m", "router", "sim", "--mode", "decode", "--count", str(d), "--port",
             str(base + 2 * p), *common],
            [u + "/health" for u in durls], deadline,
        )  # fmt: skip
        argv = _router_argv(target, port, list(zip(purls, boots, strict=True)), durls, port + 1)
        url = f"http://127.0.0.1:{port}"
        paths = ("/v1/models", "/health") if target.startswith("smg:") else ("/readiness",)
        router = await procs.start_ready(slug, argv, [url + path for path in paths], deadline)
        started = time.monotonic()
        run = await replay(
            window, ReplayConfig(url=url, api="completions", load=load, speedup=args.speedup)
        )
        summary = summarize(run.outcomes, wall_s=time.monotonic() - started)
        summary["tpot_p90"] = tpot_p90(run.outcomes)
        errors = sorted({o.error for o in run.outcomes if o.error})[:5]
        summary["errors"] = errors
        summary["router_log_tail"] = _tail(router.log_path, 600)
        return summary
    finally:
        procs.stop_all()


def table(paths: list[Path]) -> str:
    """The README's rows, read from result files (never typed by hand)."""
    import json

    rows = [
        "| run | load | target | p90 TTFT s | p50 TTFT s | p90 TPOT ms | failed | sim p90 TTFT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        doc = json.loads(path.read_text())
        for target, res in doc["results"].items():
            sim = doc["simulated"].get(target.removeprefix("smg:"), {}).get("ttft_p90")
            rows.append(
                f"| {path.name} | {doc['load']:.3f} | {target} | {res['ttft_p90']:.3f} | "
                f"{res['ttft_p50']:.3f} | {res['tpot_p90'] * 1000:.1f} | {res['failed']} | "
                + (f"{sim:.3f} |" if sim is not None else "- |")
            )
        checks = doc["checks"]
        rows.append(
            f"| {path.name} | | pair / SMG | {checks['pair_ttft_p90_over_smg']:.2f}x | | "
            f"{checks['pair_tpot_p90_over_smg']:.3f}x | | |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", default=f"pair,smg:{SMG_PAIR}")
    parser.add_argument("--prefill", type=int, default=2, help="prefill servers (default 2)")
    parser.add_argument("--decode", type=int, default=2, help="decode servers (default 2)")
    parser.add_argument("--start", type=float, default=240.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--slo-ttft-p90", type=float, default=2.0)
    parser.add_argument("--load", type=float, default=None, help="default: SMG's sim capacity")
    parser.add_argument("--precision", type=float, default=0.02)
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "pd_live.json")
    parser.add_argument("--table", nargs="*", type=Path, help="print the README rows and stop")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(args.table or [args.out]))
        return 0
    window = multi_turn(MultiTurnConfig(seed=1)).window(args.start, args.duration)
    cfg = PDSimConfig(prefill=args.prefill, decode=args.decode, profile=PROFILE)

    def sim_at(router: str, load: float) -> dict[str, Any]:
        from dataclasses import replace

        return simulate_pd(window, router, replace(cfg, load=load)).summary

    load = args.load
    capacity = None
    if load is None:
        found = find_capacity(
            lambda x: capacity_p90(sim_at(SMG_PAIR, x)),
            slo=args.slo_ttft_p90,
            start=1.0,
            precision=args.precision,
        )
        load = capacity = round(found.max_load, 3)
        print(f"simulated {SMG_PAIR} capacity (p90 TTFT <= {args.slo_ttft_p90:g} s): {load}")
    simulated = {r: sim_at(r, load) for r in ("pair", SMG_PAIR)}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pd-live-") as tmp:
        for target in args.targets.split(","):
            load_before = os.getloadavg()
            res = asyncio.run(run_target(window, target, args, load, Path(tmp)))
            res["loadavg_before"] = load_before
            results[target] = res
            print(
                f"{target}: p90 TTFT {res['ttft_p90']:.3f} s, p90 TPOT "
                f"{res['tpot_p90'] * 1000:.1f} ms, failed {res['failed']}",
                flush=True,
            )
    smg = results.get(f"smg:{SMG_PAIR}")
    ours = results.get("pair")
    checks: dict[str, Any] = {"no_failures": all(r["failed"] == 0 for r in results.values())}
    if smg and ours:
        checks["pair_ttft_p90_over_smg"] = ours["ttft_p90"] / smg["ttft_p90"]
        checks["pair_tpot_p90_over_smg"] = ours["tpot_p90"] / smg["tpot_p90"]
        checks["ttft_ok"] = checks["pair_ttft_p90_over_smg"] <= 0.7
        checks["tpot_ok"] = checks["pair_tpot_p90_over_smg"] <= 1.0
    doc = {
        "window": {"trace": "multi_turn seed 1", "start": args.start, "duration": args.duration},
        "profile": PROFILE,
        "pd": {"prefill": args.prefill, "decode": args.decode},
        "load": load,
        "smg_simulated_capacity": capacity,
        "slo_ttft_p90": args.slo_ttft_p90,
        "speedup": args.speedup,
        "machine": "shared 2-core box, no GPU; simulated PD servers in real time",
        "command": "python benchmarks/pd_live.py " + " ".join(argv or sys.argv[1:]),
        "simulated": {
            r: {k: s[k] for k in ("ttft_p90", "tpot_p90", "failed", "hit_ratio")}
            for r, s in simulated.items()
        },
        "results": results,
        "checks": checks,
    }
    write_json(args.out, doc)
    print(f"checks: {checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
