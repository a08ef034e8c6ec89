"""The TTFT no router can beat: each request's uncached prefill alone on an idle GPU.

A router chooses where a prompt goes; it cannot make the prompt's uncached tokens cheaper
than the backend's prefill speed, nor find cached a prefix that no cache could still hold.
For each request this script takes the tokens a cache could have held (one infinite cache
that saw the trace in order, and one LRU cache of the pool's total size: the "LRU bound" of
`prefix-router analyze`) and prices the rest as SGLang's chunked prefill on an idle backend
of the profile: steps of at most `--chunk` tokens, each paying the step overhead. Cached
tokens are free (host-tier loads are not charged), no queue, no decode batch: a floor.

The percentiles of those floors bound what any routing policy can reach on the trace; the
share of requests whose floor exceeds `--target` says how much of a p90 target is out of reach
before any queueing.

With `--policies`, each policy is also simulated at `--load` on the pool, and its requests are
split: over the target with a floor over it too (given the cache that run actually hit), and
over the target although their floor is not (queueing, shared steps, host loads): the part a
better router could still win. For a policy that predicts TTFT (cost, oracle) the avoidable
part is split again: predicted over the target where it was sent (the policy chose it), or
predicted under it and late (its model of the backend was wrong).

Run:  python benchmarks/ttft_floor.py --trace conversation --profile llama3-8b-h100-hicache \
          --backends 8 --target 0.974 --policies round_robin,cache_aware,cost,oracle \
          --load 0.81 --json benchmarks/results/ttft_floor.json          (~1 minute)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends.sim.perf import Profile, get_profile
from router.core.policies import POLICIES
from router.replay.analyze import ideal_cached_tokens, lru_cached_tokens
from router.replay.metrics import RequestOutcome, write_json
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace, bundled, load_trace


def floor_ttft_s(profile: Profile, prompt_tokens: int, cached_tokens: int, chunk: int) -> float:
    """Seconds to prefill the uncached part in chunked steps on an idle backend."""
    done = min(cached_tokens, max(prompt_tokens - 1, 0))  # SGLang recomputes the last token
    seconds = 0.0
    while done < prompt_tokens:
        step = min(chunk, prompt_tokens - done)
        done += step
        seconds += profile.step_overhead_s + profile.prefill_time(step, done)
    return seconds


def _summary(floors: Sequence[float], target: float) -> dict[str, float]:
    ordered = sorted(floors)
    n = len(ordered)
    return {
        "p50_s": ordered[n // 2],
        "p90_s": ordered[min(int(0.9 * n), n - 1)],
        "p99_s": ordered[min(int(0.99 * n), n - 1)],
        "share_above_target": sum(f > target for f in ordered) / n,
    }


def floors(trace: Trace, profile: Profile, backends: int, chunk: int) -> dict[str, list[float]]:
    pool_tokens = backends * (profile.kv_capacity_tokens + profile.host_capacity_tokens)
    caches = {
        "no_cache": [0] * len(trace.requests),
        "lru_pool": lru_cached_tokens(trace, pool_tokens),
        "infinite": ideal_cached_tokens(trace),
    }
    return {
        name: [
            floor_ttft_s(profile, r.input_length, c, chunk)
            for r, c in zip(trace.requests, cached, strict=True)
        ]
        for name, cached in caches.items()
    }


def split_run(
    trace: Trace,
    profile: Profile,
    policy: str,
    *,
    backends: int,
    load: float,
    target: float,
    chunk: int,
) -> dict[str, float]:
    """Simulate `policy` and split its requests over the target by their own floor."""
    run = simulate_policy(trace, policy, SimConfig(profiles=(profile,) * backends, load=load))
    done = [o for o in run.outcomes if o.ttft is not None]
    floor_over: list[RequestOutcome] = []
    avoidable: list[RequestOutcome] = []
    for o in done:
        if o.ttft is not None and o.ttft > target:
            floor = floor_ttft_s(profile, o.prompt_tokens, o.cached_tokens, chunk)
            (floor_over if floor > target else avoidable).append(o)
    n = max(len(done), 1)
    row = {
        "ttft_p90_s": float(run.summary["ttft_p90"]),
        "hit_ratio": float(run.summary["hit_ratio"]),
        "failed": int(run.summary["failed"]),
        "share_above_target": (len(floor_over) + len(avoidable)) / n,
        "share_above_target_by_floor": len(floor_over) / n,
        "share_above_target_avoidable": len(avoidable) / n,
    }
    if run.predicted_ttft:
        chose = sum(run.predicted_ttft.get(o.rid, 0.0) > target for o in avoidable)
        row["share_avoidable_predicted_over"] = chose / n
        row["share_avoidable_predicted_under_late"] = (len(avoidable) - chose) / n
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", default="conversation", help="a bundled trace name or a path")
    p.add_argument("--profile", default="llama3-8b-h100-hicache")
    p.add_argument("--backends", type=int, default=8, help="pool size (for the LRU cache)")
    p.add_argument("--chunk", type=int, default=8192, help="SGLang's chunked_prefill_size")
    p.add_argument("--target", type=float, default=1.0, help="a p90 TTFT target, seconds")
    p.add_argument("--policies", default="", help="comma-separated policies to simulate")
    p.add_argument("--load", type=float, default=1.0, help="load multiplier for --policies")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.backends <= 0 or args.chunk <= 0 or args.load <= 0:
        p.error("--backends, --chunk and --load must be positive")
    policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    unknown = [name for name in policies if name not in POLICIES]
    if unknown:
        p.error(f"unknown policies {', '.join(unknown)}; known: {', '.join(sorted(POLICIES))}")
    try:
        trace = load_trace(bundled(args.trace) if "/" not in args.trace else args.trace)
        profile = get_profile(args.profile)
    except (OSError, ValueError, KeyError) as exc:
        p.error(str(exc))
    results: dict[str, Any] = {
        "trace": args.trace,
        "profile": args.profile,
        "backends": args.backends,
        "chunk": args.chunk,
        "target_s": args.target,
        "requests": len(trace.requests),
        "floors": {
            name: _summary(values, args.target)
            for name, values in floors(trace, profile, args.backends, args.chunk).items()
        },
    }
    print(f"{args.trace} on {args.profile} ({len(trace.requests)} requests), idle-GPU TTFT floor:")
    for name, row in results["floors"].items():
        print(
            f"  {name:9s} p50 {row['p50_s']:.3f} s  p90 {row['p90_s']:.3f} s  "
            f"p99 {row['p99_s']:.3f} s  above {args.target:g} s: {row['share_above_target']:.1%}"
        )
    if policies:
        results["load"] = args.load
        results["runs"] = {}
        print(f"simulated at load {args.load:g} on {args.backends} backends:")
    for policy in policies:
        row = split_run(
            trace,
            profile,
            policy,
            backends=args.backends,
            load=args.load,
            target=args.target,
            chunk=args.chunk,
        )
        results["runs"][policy] = row
        print(
            f"  {policy:12s} p90 {row['ttft_p90_s']:.3f} s  hit {row['hit_ratio']:.3f}  "
            f"above {args.target:g} s: {row['share_above_target']:.1%} "
            f"(floor above too: {row['share_above_target_by_floor']:.1%}, "
            f"avoidable: {row['share_above_target_avoidable']:.1%})"
        )
        if "share_avoidable_predicted_over" in row:
            print(
                f"  {'':12s} avoidable: predicted over the target where sent "
                f"{row['share_avoidable_predicted_over']:.1%}, predicted under and late "
                f"{row['share_avoidable_predicted_under_late']:.1%}"
            )
    if args.json:
        write_json(Path(args.json), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
