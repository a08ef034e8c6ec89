"""How well the cost policy learns each backend's PP and TG when the router's prior is wrong.

Two pools of 4 simulated backends, the router told that every backend is an H100
(`llama3-8b-h100`): (1) all four really run at half that speed (MFU, bandwidth efficiency
halved, step overhead doubled); (2) two H100s and two A100s. A trace of 240 unshared requests
(1k-12k prompt tokens, 50-300 output) arrives at a few rates; after it, each backend's learned
prefill speed (uncached 2,048-token prompt) and decode step (4,096 KV tokens) are set beside
the truth, with the number of observations behind them.

Run: python benchmarks/calibration.py --json benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from backends.sim.perf import Profile, get_profile
from router.core.cost_policy import CostPolicy
from router.replay.gentrace import UnsharedConfig, unshared
from router.replay.simulate import SimConfig, simulate_policy


def half_speed(profile: Profile) -> Profile:
    return dataclasses.replace(
        profile,
        name=f"{profile.name}-at-half-speed",
        mfu=profile.mfu / 2,
        bw_efficiency=profile.bw_efficiency / 2,
        step_overhead_s=profile.step_overhead_s * 2,
    )


def run(pool: str, truth: tuple[Profile, ...], rate: float, seed: int) -> list[dict[str, Any]]:
    believed = (get_profile("llama3-8b-h100"),) * len(truth)
    result = simulate_policy(
        unshared(UnsharedConfig(requests=240, request_rate=rate, seed=seed)),
        "cost",
        SimConfig(profiles=truth, believed=believed),
    )
    policy = result.core.policy
    assert isinstance(policy, CostPolicy)
    rows = []
    for i, profile in enumerate(truth):
        perf = policy._models[f"b{i}"].perf
        true_pp = 2048 / profile.prefill_time(2048, 2048)
        true_step = profile.decode_step_time(1, 4096)
        learned_pp = 2048 / perf.prefill_time(2048, 2048)
        learned_step = perf.decode_step_time(4096)
        rows.append(
            {
                "pool": pool,
                "rate": rate,
                "backend": f"b{i}",
                "profile": profile.name,
                "routed": result.stats["backends"][f"b{i}"]["routed"],
                "pp_true": true_pp,
                "pp_learned": learned_pp,
                "pp_error": learned_pp / true_pp - 1,
                "tg_step_true_s": true_step,
                "tg_step_learned_s": learned_step,
                "tg_error": learned_step / true_step - 1,
                "prefill_observations": perf.prefill_observations,
                "decode_observations": perf.decode_observations,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rates", default="0.5,3,6", help="arrival rates, requests/s")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    h100, a100 = get_profile("llama3-8b-h100"), get_profile("llama3-8b-a100")
    pools = {"2x-slower": (half_speed(h100),) * 4, "h100+a100": (h100, h100, a100, a100)}
    rows: list[dict[str, Any]] = []
    print(
        "| pool | req/s | backend | truth | routed | PP learned / true | TG step learned / true "
        "| observations (PP, TG) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rate in (float(r) for r in args.rates.split(",")):
        for pool, truth in pools.items():
            for row in run(pool, truth, rate, args.seed):
                rows.append(row)
                print(
                    f"| {pool} | {rate:g} | {row['backend']} | {row['profile']} | {row['routed']} "
                    f"| {row['pp_learned']:,.0f} / {row['pp_true']:,.0f} ({row['pp_error']:+.1%}) "
                    f"| {row['tg_step_learned_s'] * 1e3:.2f} / {row['tg_step_true_s'] * 1e3:.2f} ms"
                    f" ({row['tg_error']:+.1%}) | {row['prefill_observations']}, "
                    f"{row['decode_observations']} |",
                    flush=True,
                )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
