"""Record a replayed window through `serve --record`, then plan and check from the recording.

The acceptance run of "plan your pool from your own traffic" (benchmarks/record_plan.md):

1. generate a 10-minute multi-turn window (`gen-trace --kind multi-turn`, seeded);
2. `prefix-router sim --count N` (simulated H100s, real time, their own process) and
   `prefix-router serve --backends ... --record REC` in front of them; replay the window
   through it with `prefix-router replay` (the live run; `--live` does it, or pass
   `--recording` and `--replay-json` from an earlier run);
3. compare the recording with the original: hit ratio simulated per policy on the same pool
   (both traces), the live hit ratio, the ideal and LRU bounds, prompt words in the file;
4. `plan` on the recording (every policy, growth factors, SLO) and `plan --check` on the
   recorded pool: the JSON and plot under benchmarks/results/.

Run (about 12 minutes with --live, under the heavy-run lock on the shared box):
    flock /tmp/prefix-router-heavy.lock .venv/bin/python benchmarks/record_plan.py --live
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from backends.sim.perf import get_profile
from router.replay.analyze import ideal_hit_ratio, lru_hit_ratio
from router.replay.metrics import write_json
from router.replay.plan import PlanConfig, check, format_plan, plan, plot_plan
from router.replay.ports import free_port, free_port_block
from router.replay.recording import leaked_prompt_words, live_view
from router.replay.report import plot_ttft_cdf
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLI = [sys.executable, "-m", "router"]


def _wait_ready(url: str, path: str) -> None:
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + path, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url}{path} never answered")


def _live(trace_path: Path, rec: Path, replay_json: Path, backends: int, profile: str) -> None:
    """`prefix-router sim` (its own process) and `serve --record REC` in front of it, then
    replay the window through the router and stop both (Ctrl-C).

    The simulated GPUs run in a process of their own, as real GPUs run on machines of their own:
    `serve --embedded` would put their tokenizing and streaming on the router's event loop, and
    the TTFT the router records would carry that CPU time, which no engine model predicts.
    """
    sim_port, port = free_port_block(backends), free_port()
    sim = subprocess.Popen(
        [*CLI, "sim", "--count", str(backends), "--port", str(sim_port), "--profile", profile,
         "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{sim_port + i}" for i in range(backends)]
    serve: subprocess.Popen[bytes] | None = None
    try:
        for u in urls:
            _wait_ready(u, "/health")
        serve = subprocess.Popen(
            [*CLI, "serve", "--workers", "1", "--backends", ",".join(urls), "--profile",
             profile, "--port", str(port), "--record", str(rec), "--log-level", "WARNING"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, "/readiness")
        subprocess.run(
            [*CLI, "replay", "--trace", str(trace_path), "--url", url, "--api", "completions",
             "--json", str(replay_json), "--quiet"],
            cwd=REPO, check=True,
        )  # fmt: skip
    finally:
        for proc in (serve, sim):
            if proc is not None:
                proc.send_signal(2)
                proc.wait(30)


def tables(doc: dict[str, Any]) -> str:
    """record_plan.md's hit-ratio, plan and check tables from a committed JSON."""
    fid, chk = doc["fidelity"], doc["check"]
    out = ["| policy (simulated, recorded pool) | original | recording | difference |",
           "|---|---:|---:|---:|"]  # fmt: skip
    for policy, h in fid["simulated_hit_ratio"].items():
        out.append(f"| {policy} | {h['original']:.4f} | {h['recording']:.4f} | "
                   f"{h['difference']:+.4f} |")  # fmt: skip
    plan_doc = doc["plan"]
    growths = [f"{g['growth']:g}x" for g in next(iter(plan_doc["plan"].values()))]
    out += ["", f"| policy | {' | '.join(growths)} |", "|---" * (len(growths) + 1) + "|"]
    for policy, cells in plan_doc["plan"].items():
        shown = []
        for g in cells:
            meets, fewer = g["meets"], g["one_fewer"]
            shown.append(
                "-"
                if meets is None
                else f"{g['backends']} ({meets['ttft_p90']:.3f} s; "
                + ("-" if fewer is None else f"{fewer['backends']}: {fewer['ttft_p90']:.3g} s")
                + ")"
            )
        out.append(f"| {policy} | {' | '.join(shown)} |")
    out += ["", "| TTFT (s) | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
    for name, key in (("simulated (virtual time)", "ttft_simulated"),
                      ("live (what the router measured)", "ttft_live")):  # fmt: skip
        t = chk[key]
        out.append(f"| {name} | {t['mean']:.4f} | {t['p50']:.4f} | {t['p90']:.3f} | "
                   f"{t['p99']:.3f} |")  # fmt: skip
    out.append(f"\nsimulated / live mean: {chk['mean_ratio_simulated_over_live']:.3f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "record_plan",
        help="scratch folder (default: record_plan in the system's temporary folder)",
    )
    p.add_argument("--live", action="store_true", help="run the live recording (10 minutes)")
    p.add_argument("--recording", type=Path, help="an earlier run's recording")
    p.add_argument("--replay-json", type=Path, help="an earlier run's replay JSON")
    p.add_argument("--backends", type=int, default=2, help="recorded pool (default 2)")
    p.add_argument("--session-rate", type=float, default=2.0, help="multi-turn sessions/s")
    p.add_argument("--profile", default="llama3-8b-h100", help="profile to plan for")
    p.add_argument("--slo-ttft-p90", type=float, default=0.2)
    p.add_argument("--growth", default="1,1.5,2,3")
    p.add_argument("--policies", default="round_robin,cache_aware,cost")
    p.add_argument("--name", default="record_plan", help="results file stem")
    p.add_argument("--tables", action="store_true", help="print the tables of the JSON and stop")
    args = p.parse_args()
    if args.tables:
        print(tables(json.loads((RESULTS / f"{args.name}.json").read_text())))
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    trace_path = args.work / "multi_turn_600s.jsonl"
    subprocess.run(
        [*CLI, "gen-trace", "--kind", "multi-turn", "--duration", "600", "--session-rate",
         str(args.session_rate), "--seed", "0", "--out", str(trace_path)],
        cwd=REPO, check=True,
    )  # fmt: skip
    rec = args.recording or args.work / "recording.jsonl"
    replay_json = args.replay_json or args.work / "replay.json"
    if args.live:
        rec.unlink(missing_ok=True)
        _live(trace_path, rec, replay_json, args.backends, args.profile)
    original, recorded = load_trace(trace_path), load_trace(rec)
    live = live_view(rec)
    replayed = json.loads(replay_json.read_text())["results"]["replay"]
    profile = get_profile(args.profile)
    pool_kv = live.backends * profile.kv_capacity_tokens

    hits: dict[str, Any] = {}
    sim_cfg = SimConfig(profiles=(args.profile,) * live.backends)
    for policy in args.policies.split(","):
        a = simulate_policy(original, policy, sim_cfg).summary["hit_ratio"]
        b = simulate_policy(recorded, policy, sim_cfg).summary["hit_ratio"]
        hits[policy] = {"original": a, "recording": b, "difference": b - a}
        print(f"hit ratio {policy} on {live.backends}: original {a:.4f}, recording {b:.4f}")
    fidelity = {
        "requests": {"original": len(original.requests), "recording": len(recorded.requests)},
        "block_size": {"original": original.block_size, "recording": recorded.block_size},
        "ideal_hit_ratio": {
            "original": ideal_hit_ratio(original),
            "recording": ideal_hit_ratio(recorded),
        },
        "lru_bound_hit_ratio": {
            "original": lru_hit_ratio(original, pool_kv),
            "recording": lru_hit_ratio(recorded, pool_kv),
        },
        "simulated_hit_ratio": hits,
        "live_hit_ratio_replay": replayed["hit_ratio"],
        "prompt_words_in_file": leaked_prompt_words(rec, original),
        "file_bytes": rec.stat().st_size,
    }

    cfg = PlanConfig(profile=profile, slo_ttft_p90=args.slo_ttft_p90)
    growths = [float(g) for g in args.growth.split(",")]
    doc = plan(recorded, args.policies.split(","), growths, cfg)
    print(format_plan(doc))
    checked, outcomes = check(recorded, live, live.policy or "cost", live.backends, cfg)
    print(json.dumps(checked, indent=1))
    out = {
        "note": "taken on a shared 2-core box; the live part is one run",
        "command": "python benchmarks/record_plan.py " + " ".join(sys.argv[1:]),
        "live": {
            "backends": live.backends,
            "policy": live.policy,
            "replay": {
                k: replayed[k] for k in ("requests", "failed", "ttft_mean", "ttft_p90", "hit_ratio")
            },
        },
        "fidelity": fidelity,
        "plan": doc,
        "check": checked,
    }
    write_json(RESULTS / f"{args.name}.json", out)
    plot_plan(doc, RESULTS / f"{args.name}.png")
    from router.replay.metrics import RequestOutcome

    measured = [
        RequestOutcome(rid=str(i), arrival=0.0, prompt_tokens=0, output_tokens=1, cached_tokens=0,
                       ttft=t, tpot=None, e2e=t)
        for i, t in enumerate(live.ttfts)
    ]  # fmt: skip
    plot_ttft_cdf(
        {"live (recorded by the router)": measured, "simulated": outcomes},
        RESULTS / f"{args.name}_check.png",
        title=f"plan --check: {live.backends} x {args.profile}, {live.policy}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
