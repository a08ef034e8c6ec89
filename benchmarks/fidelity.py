"""Fidelity: the same window through `simulate` (virtual time) and `compare` (live HTTP).

Runs the window through the virtual-time simulator for round_robin, cache_aware and cost, then
through `prefix-router compare` with our router (the same three policies) and the real
sglang-router 0.3.2 (cache_aware, round_robin), or with `--reference smg` SMG 1.13's. For
each pair it reports live/sim mean TTFT; the target is agreement within 15%. Pairs:

    sim cost         <-> live cost
    sim cache_aware  <-> live cache_aware, live sglang-router:cache_aware
    sim round_robin  <-> live round_robin, live sglang-router:round_robin

Where a pair disagrees, the per-request view says which side is wrong. The same trace index
has the same rid ("r<position>") in both runs, so for each pair it reports: the median of
per-request live/sim TTFT, how many requests landed on the same backend (live backends are
numbered by port, sim ones b0..; under the relabelling that agrees most, since only the
partition matters), mean TTFT of the agreeing and the disagreeing requests on both sides,
cached tokens on both sides, and the requests with the largest gaps. For our policies it also
sets the live router's learned speeds (its /stats) beside the simulated router's (`learned()`),
and records the load average of the machine before and after, since a busy box slows the
live side only.

Two re-runs of the simulator then take routing and burst order out of the comparison: each of
our live targets' routing pinned onto the simulator (`sim_pinned_to_live_routing`), and the
same with every burst of equal timestamps taken shortest prompt first (`short_first`), the
order the live race tends to; `sim_short_first_within_bursts` is the unpinned simulator in
that order. `--live-dir DIR` re-analyses a finished live run.

Result: benchmarks/results/fidelity_<name>.json (+ the live run's CDF .png).

Run:  python benchmarks/fidelity.py                 (conversation window, 4 x h100-hicache)
      python benchmarks/fidelity.py --duration 60 --speedup 2 --name quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from router.core.model import BackendState, BasePolicy, Choice, RouteRequest
from router.core.policies import POLICIES
from router.replay.metrics import RequestOutcome, write_json
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace, TraceRequest, bundled, load_trace

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {
    "cost": ["cost"],
    "cache_aware": ["cache_aware", "sglang-router:cache_aware"],
    "round_robin": ["round_robin", "sglang-router:round_robin"],
}


def pairs_for(reference: str) -> dict[str, list[str]]:
    """PAIRS with the reference router (`sglang-router` or `smg`, router.replay.launchers)."""
    return {
        pol: [t.replace("sglang-router:", f"{reference}:") for t in targets]
        for pol, targets in PAIRS.items()
    }


class _PinnedPolicy(BasePolicy):
    """Routes each rid where the live router sent it: the simulator given live's decisions."""

    name = "fidelity_pinned"

    def __init__(self, rng: Any = None, *, assignment: dict[str, int]) -> None:
        super().__init__(rng)
        self.assignment = assignment

    def choose(self, req: RouteRequest, backends: Any, now: float) -> Choice:
        states: list[BackendState] = sorted(backends, key=lambda b: int(b.id[1:]))
        return Choice(backend=states[self.assignment[req.rid] % len(states)].id, reason="pinned")


def pinned_config(cfg: SimConfig, live: list[dict[str, Any]]) -> SimConfig:
    """`cfg` with the pinned policy registered and told each rid's live backend (by port)."""
    urls = sorted(
        {o["backend"] for o in live if o["backend"]}, key=lambda u: int(u.rsplit(":")[-1])
    )
    index = {u: i for i, u in enumerate(urls)}
    assignment = {o["rid"]: index[o["backend"]] for o in live if o["backend"]}
    POLICIES.setdefault(_PinnedPolicy.name, _PinnedPolicy)
    return SimConfig(
        profiles=cfg.profiles, load=cfg.load, policy_options={"assignment": assignment}
    )


def sim_with_live_routing(
    window: Any, cfg: SimConfig, live: list[dict[str, Any]]
) -> dict[str, Any]:
    """Re-run the simulator with every request pinned to its live backend (ports -> b0..).

    Routing order inside a burst of equal timestamps is a lottery live (concurrent sends,
    tokenization off the event loop for long prompts) but fixed in the simulator; pinning
    takes routing out, so what is left between the two is the engine and the HTTP path.
    """
    run = simulate_policy(window, _PinnedPolicy.name, pinned_config(cfg, live))
    return {
        "summary": run.summary,
        "live_over_pinned_sim_ttft_mean": _ratio(live, "ttft", run.summary["ttft_mean"]),
        "per_request": per_request(run.outcomes, live),
    }


def short_first(window: Trace) -> tuple[Trace, dict[str, str]]:
    """The window with each burst of equal timestamps ordered shortest prompt first.

    Mooncake timestamps come in bursts (the conversation trace: one every ~3 s, up to 18
    requests each). The simulator takes a burst in file order; live, the requests of a burst
    race, and long ones reach the engine last (their text is built, sent and tokenized for
    longer). This is the other extreme of that race. Returns the trace and old rid -> new rid.
    """
    groups: dict[float, list[TraceRequest]] = {}
    for r in window.requests:
        groups.setdefault(r.timestamp, []).append(r)
    position = {r.index: i for i, r in enumerate(window.requests)}
    reqs: list[TraceRequest] = []
    for t in sorted(groups):
        for k, r in enumerate(sorted(groups[t], key=lambda r: r.input_length)):
            reqs.append(replace(r, timestamp=t + 1e-4 * k))
    rids = {f"r{position[r.index]}": f"r{i}" for i, r in enumerate(reqs)}
    return replace(window, requests=tuple(reqs)), rids


def _ratio(live: list[dict[str, Any]], key: str, sim_mean: float) -> float:
    values = [o[key] for o in live if o["error"] is None and o[key] is not None]
    return statistics.fmean(values) / sim_mean if values and sim_mean else float("nan")


def _relabel(sim: list[str], live: list[str]) -> tuple[dict[str, str], int]:
    """The live->sim backend naming under which most requests agree, and how many do."""
    live_ids, sim_ids = sorted(set(live)), sorted(set(sim))
    best: tuple[dict[str, str], int] = ({}, -1)
    if len(live_ids) > 8 or not live_ids:
        return best[0], 0
    for perm in itertools.permutations(sim_ids + [""] * max(len(live_ids) - len(sim_ids), 0)):
        mapping = dict(zip(live_ids, perm, strict=False))
        same = sum(mapping.get(lv) == sv for sv, lv in zip(sim, live, strict=True))
        if same > best[1]:
            best = (mapping, same)
    return best


def per_request(
    sim: list[RequestOutcome], live: list[dict[str, Any]], worst: int = 8
) -> dict[str, Any]:
    """Request by request: where live and sim TTFT part, and whether routing explains it."""
    sim_by = {o.rid: o for o in sim if not o.failed}
    both = [(sim_by[lv["rid"]], lv) for lv in live if lv["error"] is None and lv["rid"] in sim_by]
    if not both:
        return {"matched": 0}
    ratios = [lv["ttft"] / s.ttft for s, lv in both if s.ttft]
    out: dict[str, Any] = {
        "matched": len(both),
        "median_ttft_ratio": statistics.median(ratios),
        "share_within_15pct": sum(abs(r - 1) <= 0.15 for r in ratios) / len(ratios),
        "sim_cached_tokens": sum(s.cached_tokens for s, _ in both),
        "live_cached_tokens": sum(lv["cached_tokens"] for _, lv in both),
        "sim_ttft_sum": sum(s.ttft or 0 for s, _ in both),
        "live_ttft_sum": sum(lv["ttft"] for _, lv in both),
    }
    if all(lv["backend"] for _, lv in both):
        sims = [s.backend or "" for s, _ in both]
        mapping, same = _relabel(sims, [lv["backend"] for _, lv in both])
        agree = [mapping.get(lv["backend"]) == s.backend for s, lv in both]
        out["same_backend_share"] = same / len(both)
        for key, flag in (("same_backend", True), ("other_backend", False)):
            part = [(s, lv) for (s, lv), a in zip(both, agree, strict=True) if a == flag]
            if part:
                out[key] = {
                    "requests": len(part),
                    "sim_ttft_mean": statistics.fmean(s.ttft or 0 for s, _ in part),
                    "live_ttft_mean": statistics.fmean(lv["ttft"] for _, lv in part),
                    "sim_cached_tokens": sum(s.cached_tokens for s, _ in part),
                    "live_cached_tokens": sum(lv["cached_tokens"] for _, lv in part),
                }
    gaps = sorted(both, key=lambda p: abs(p[1]["ttft"] - (p[0].ttft or 0)), reverse=True)
    out["largest_gaps"] = [
        {
            "rid": s.rid,
            "arrival": round(s.arrival, 3),
            "prompt": s.prompt_tokens,
            "sim_ttft": s.ttft,
            "live_ttft": lv["ttft"],
            "sim_cached": s.cached_tokens,
            "live_cached": lv["cached_tokens"],
            "sim_backend": s.backend,
            "live_backend": lv["backend"],
        }
        for s, lv in gaps[:worst]
    ]
    return out


def _learned_side_by_side(sim_core: Any, stats: dict[str, Any] | None) -> dict[str, Any]:
    """Per backend, the sim router's learned speeds beside the live router's (by port order)."""
    learned = getattr(sim_core.policy, "learned", None)
    sim_learned = learned() if callable(learned) else {}
    rows = sorted((stats or {}).get("backends") or [], key=lambda r: r["url"])
    live_learned = {
        f"live{i}:{r['url'].rsplit(':', 1)[-1]}": r.get("learned") for i, r in enumerate(rows)
    }
    return {"sim": sim_learned, "live": live_learned}


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
    p.add_argument(
        "--reference",
        choices=["sglang-router", "smg"],
        default="sglang-router",
        help="the reference router paired with our cache_aware / round_robin: sglang-router "
        "0.3.2 or smg (SMG 1.13; its cache_aware has moved on from 0.3.2's rule)",
    )
    p.add_argument(
        "--live-dir", type=Path, default=None,
        help="re-analyse a finished live run (its live.json and outcomes.json) instead of running",
    )  # fmt: skip
    args = p.parse_args()

    path = Path(args.trace)
    trace = load_trace(path if path.exists() else bundled(args.trace))
    window = trace.window(args.start, args.duration)
    cfg = SimConfig(profiles=(args.profile,) * args.backends, load=args.load)
    sim_runs = {pol: simulate_policy(window, pol, cfg) for pol in PAIRS}
    sim = {pol: run.summary for pol, run in sim_runs.items()}
    sf_window, sf_rids = short_first(window)
    sim_sf = {pol: simulate_policy(sf_window, pol, cfg).summary for pol in PAIRS}

    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = args.live_dir or Path(tempfile.mkdtemp())
    live_json, live_outcomes = tmp / "live.json", tmp / "outcomes.json"
    pairs_by_policy = pairs_for(args.reference)
    targets = ",".join(t for ts in pairs_by_policy.values() for t in ts)
    cmd = [
        sys.executable, "-m", "router", "compare", "--trace", args.trace,
        "--backends", str(args.backends), "--profile", args.profile,
        "--start", f"{args.start:g}", "--duration", f"{args.duration:g}",
        "--load", f"{args.load:g}", "--speedup", f"{args.speedup:g}", "--targets", targets,
        "--json", str(live_json), "--outcomes", str(live_outcomes),
        "--plot", str(RESULTS / f"fidelity_{args.name}.png"), "--quiet",
    ]  # fmt: skip
    load_before = load_after = os.getloadavg()
    if args.live_dir is None:
        print(f"live run in {tmp}", flush=True)
        subprocess.run(cmd, check=True)
        load_after = os.getloadavg()
    live_doc = json.loads(live_json.read_text())
    (RESULTS / f"fidelity_{args.name}_outcomes.json").write_text(live_outcomes.read_text())
    live = live_doc["results"]
    outcomes = json.loads(live_outcomes.read_text())

    for pol in PAIRS:
        a, b = sim[pol], sim_sf[pol]
        print(f"{pol:12s} sim file order {a['ttft_mean']:.3f} / p90 {a['ttft_p90']:.3f}; "
              f"short first in bursts {b['ttft_mean']:.3f} / p90 {b['ttft_p90']:.3f}")  # fmt: skip
    pairs: list[dict[str, Any]] = []
    for pol, live_targets in pairs_by_policy.items():
        for target in live_targets:
            s, lv = sim[pol]["ttft_mean"], live[target]["ttft_mean"]
            ratio = lv / s if s else float("nan")
            pairs.append({
                "sim_policy": pol, "live_target": target, "sim_ttft_mean": s,
                "live_ttft_mean": lv, "ratio": ratio,
                "sim_ttft_p90": sim[pol]["ttft_p90"], "live_ttft_p90": live[target]["ttft_p90"],
                "sim_hit_ratio": sim[pol]["hit_ratio"], "live_hit_ratio": live[target]["hit_ratio"],
                "within_tolerance": abs(ratio - 1) <= args.tolerance,
                "per_request": per_request(sim_runs[pol].outcomes, outcomes[target]),
            })  # fmt: skip
            if target in live_doc.get("router_stats", {}):
                pairs[-1]["sim_pinned_to_live_routing"] = sim_with_live_routing(
                    window, cfg, outcomes[target]
                )
                renamed = [{**o, "rid": sf_rids[o["rid"]]} for o in outcomes[target]]
                pairs[-1]["sim_pinned_short_first"] = sim_with_live_routing(sf_window, cfg, renamed)
                pairs[-1]["learned"] = _learned_side_by_side(
                    sim_runs[pol].core, live_doc["router_stats"][target]
                )
            pr = pairs[-1]["per_request"]
            print(
                f"{pol:12s} sim {s:7.3f}  {target:26s} live {lv:7.3f}  ratio {ratio:.3f}  "
                f"per-request median {pr.get('median_ttft_ratio', float('nan')):.3f}  "
                f"same backend {pr.get('same_backend_share', float('nan')):.2f}"
            )
    doc = {
        "trace": window.name, "backends": args.backends, "profile": args.profile,
        "start": args.start, "duration": args.duration, "load": args.load,
        "speedup": args.speedup, "tolerance": args.tolerance,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "total_wall_s": live_doc.get("total_wall_s"), "sim": sim,
        "sim_short_first_within_bursts": sim_sf, "live": live, "pairs": pairs,
    }  # fmt: skip
    out = RESULTS / f"fidelity_{args.name}.json"
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
