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
  pair:slo-tpot=S            (optional) ours with `--slo-tpot S`: no request bound to a decode
                             server while its predicted step there passes S seconds

The load is SMG's capacity as the simulator sees it: the highest load at which
`cache_aware+power_of_two` keeps p90 TTFT <= the SLO on this window (find_capacity, to
`--precision`), or `--load`. Our simulated cache_aware is sglang-router 0.3.2's rule, not SMG
1.13's own: the live runs are the check. Figures: p90 TTFT and p90 TPOT per target, failed
requests; checks: our p90 TTFT <= 0.7 x SMG's, our p90 TPOT <= SMG's, no failure, per run.
TPOT is each request's mean gap between output tokens after the first, as the client sees
them ((last token's arrival - first token's) / (output tokens - 1)); p90 across requests.
`--runs N` repeats the targets N times, every other run in reverse order (so neither side
always runs first on a warm box). `decode_ceiling` in the JSON: the decode step with the KV
pool full, which bounds every request's TPOT (docs/pd.md, benchmarks/pd_tpot.py).
Results: benchmarks/results/pd_live.json. Taken on a shared 2-core box.

Run:  python benchmarks/pd_live.py                       (~2 minutes a run)
      python benchmarks/pd_live.py --runs 3
      python benchmarks/pd_live.py --load 3 --targets pair,smg:cache_aware+power_of_two
      python benchmarks/pd_live.py --targets pair,pair:slo-tpot=0.025,smg:cache_aware+power_of_two
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

from backends.sim.perf import get_profile
from router.replay.client import ReplayConfig, replay
from router.replay.compare import ProcessSet, _tail
from router.replay.gentrace import MultiTurnConfig, multi_turn
from router.replay.metrics import RequestOutcome, percentile, summarize, write_json
from router.replay.pd_simulate import PDSimConfig, simulate_pd, tpot_slo_of
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
    slo = tpot_slo_of(target)
    if slo is not None:
        argv += ["--slo-tpot", f"{slo:g}"]
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
        summary.update(tpot_figures(run.outcomes))
        errors = sorted({o.error for o in run.outcomes if o.error})[:5]
        summary["errors"] = errors
        summary["decode_split"] = await decode_split(durls)
        summary["router_log_tail"] = _tail(router.log_path, 600)
        return summary
    finally:
        procs.stop_all()


async def decode_split(urls: list[str]) -> dict[str, dict[str, float]]:
    """Requests and output tokens each decode server finished (its `sglang:*` counters)."""
    import aiohttp

    wanted = {"sglang:num_requests_total": "requests", "sglang:generation_tokens_total": "tokens"}
    split: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            row = split[url] = {}
            for line in text.splitlines():
                name, _, value = line.partition("{")
                if name in wanted:
                    row[wanted[name]] = float(value.rsplit(" ", 1)[1])
    return split


def tpot_figures(outcomes: list[RequestOutcome]) -> dict[str, float]:
    """p50 / p90 / p99 / max of the per-request TPOT (mean gap after the first token)."""
    tpots = sorted(o.tpot for o in outcomes if o.tpot is not None and not o.failed)
    figures = {f"tpot_p{q}": percentile(tpots, q) for q in (50, 90, 99)}
    figures["tpot_max"] = tpots[-1] if tpots else float("nan")
    return figures


def _runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a result file (files from before `--runs` hold one, at the top level)."""
    return doc.get("runs") or [{"results": doc["results"], "checks": doc["checks"]}]


def table(paths: list[Path]) -> str:
    """The README's rows, read from result files (never typed by hand)."""
    import json

    rows = [
        "| run | load | target | p90 TTFT s | p50 TTFT s | p90 TPOT ms | mean TPOT ms | failed "
        "| requests per decode server | sim p90 TTFT s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        doc = json.loads(path.read_text())
        many = len(_runs(doc)) > 1
        for i, run in enumerate(_runs(doc)):
            name = f"{path.name} #{i + 1}" if many else path.name
            for target, res in run["results"].items():
                sim = doc["simulated"].get(target.removeprefix("smg:"), {}).get("ttft_p90")
                split = res.get("decode_split")
                per_decode = (
                    " / ".join(f"{row['requests']:.0f}" for row in split.values()) if split else "-"
                )
                rows.append(
                    f"| {name} | {doc['load']:.3f} | {target} | {res['ttft_p90']:.3f} | "
                    f"{res['ttft_p50']:.3f} | {res['tpot_p90'] * 1000:.2f} | "
                    f"{res['tpot_mean'] * 1000:.2f} | {res['failed']} | {per_decode} | "
                    + (f"{sim:.3f} |" if sim is not None else "- |")
                )
            checks = run["checks"]
            for label, c in [("pair", checks), *checks.get("slo_tpot", {}).items()]:
                mean = c.get("pair_tpot_mean_over_smg")
                rows.append(
                    f"| {name} | | {label} / SMG | {c['pair_ttft_p90_over_smg']:.2f}x | | "
                    f"{c['pair_tpot_p90_over_smg']:.4f}x | "
                    + (f"{mean:.4f}x | | | |" if mean is not None else "- | | | |")
                )
    return "\n".join(rows)


def _against_smg(ours: dict[str, Any], smg: dict[str, Any]) -> dict[str, Any]:
    ttft, tpot = ours["ttft_p90"] / smg["ttft_p90"], ours["tpot_p90"] / smg["tpot_p90"]
    return {
        "pair_ttft_p90_over_smg": ttft,
        "pair_tpot_p90_over_smg": tpot,
        "pair_tpot_mean_over_smg": ours["tpot_mean"] / smg["tpot_mean"],
        "ttft_ok": ttft <= 0.7,
        "tpot_ok": tpot <= 1.0,
    }


def _checks(results: dict[str, Any]) -> dict[str, Any]:
    """`pair` against SMG at the top level; any `pair:slo-tpot=S` target under `slo_tpot`."""
    smg = results.get(f"smg:{SMG_PAIR}")
    ours = results.get("pair")
    checks: dict[str, Any] = {"no_failures": all(r["failed"] == 0 for r in results.values())}
    if smg and ours:
        checks.update(_against_smg(ours, smg))
    if smg:
        slo = {t: _against_smg(r, smg) for t, r in results.items() if tpot_slo_of(t) is not None}
        if slo:
            checks["slo_tpot"] = slo
    return checks


def _all_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run's checks side by side, and whether each held in all of them."""
    checks = [r["checks"] for r in runs]
    keys = ("pair_ttft_p90_over_smg", "pair_tpot_p90_over_smg", "pair_tpot_mean_over_smg")

    def side_by_side(per_run: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            f"{k}_all": all(c.get(k, False) for c in per_run) for k in ("ttft_ok", "tpot_ok")
        }
        return out | {key: [c.get(key) for c in per_run] for key in keys}

    out = {"runs": len(runs), "no_failures_all": all(c.get("no_failures") for c in checks)}
    out |= side_by_side(checks)
    targets = sorted({t for c in checks for t in c.get("slo_tpot", {})})
    if targets:
        out["slo_tpot"] = {
            t: side_by_side([c.get("slo_tpot", {}).get(t, {}) for c in checks]) for t in targets
        }
    return out


def _decode_ceiling() -> dict[str, float]:
    """The decode step at an empty and at a full KV pool (the range every TPOT lies in)."""
    profile = get_profile(PROFILE)
    full = profile.kv_capacity_tokens
    return {
        "kv_capacity_tokens": full,
        "step_s_weights_only": profile.decode_step_time(1, 0),
        "step_s_full_kv": profile.decode_step_time(1, full),
        "s_per_kv_token": profile.decode_coefficients()[1],
    }


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
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat the targets, every other run reversed"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "pd_live.json")
    parser.add_argument("--table", nargs="*", type=Path, help="print the README rows and stop")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(args.table or [args.out]))
        return 0
    window = multi_turn(MultiTurnConfig(seed=1)).window(args.start, args.duration)
    cfg = PDSimConfig(prefill=args.prefill, decode=args.decode, profile=PROFILE)

    def sim_at(target: str, load: float) -> dict[str, Any]:
        from dataclasses import replace

        slo = tpot_slo_of(target)
        at = replace(cfg, load=load, tpot_slo_s=slo)
        return simulate_pd(window, "pair" if slo is not None else target, at).summary

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
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    targets = args.targets.split(",")
    extra = [t for t in targets if tpot_slo_of(t) is not None]
    simulated = {r: sim_at(r, load) for r in ("pair", SMG_PAIR, *extra)}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pd-live-") as tmp:
        for i in range(args.runs):
            order = targets if i % 2 == 0 else targets[::-1]
            results: dict[str, Any] = {}
            for target in order:
                load_before = os.getloadavg()
                res = asyncio.run(run_target(window, target, args, load, Path(tmp)))
                res["loadavg_before"] = load_before
                results[target] = res
                print(
                    f"run {i + 1}/{args.runs} {target}: p90 TTFT {res['ttft_p90']:.3f} s, "
                    f"p90 TPOT {res['tpot_p90'] * 1000:.3f} ms (mean "
                    f"{res['tpot_mean'] * 1000:.3f}), failed {res['failed']}",
                    flush=True,
                )
            runs.append({"order": order, "results": results, "checks": _checks(results)})
            print(f"run {i + 1} checks: {runs[-1]['checks']}", flush=True)
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
        "decode_ceiling": _decode_ceiling(),
        "simulated": {
            r: {k: s[k] for k in ("ttft_p90", "tpot_p90", "tpot_mean", "failed", "hit_ratio")}
            for r, s in simulated.items()
        },
        "runs": runs,
        "checks": _all_runs(runs),
    }
    write_json(args.out, doc)
    print(f"checks over {args.runs} run(s): {doc['checks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
