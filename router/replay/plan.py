"""Capacity planning from a trace: how many backends each policy needs to meet the SLOs.

For each policy and growth factor g (the trace's arrival rate x g, `simulate`'s `load`), the
smallest pool of identical backends whose simulated p90 TTFT (and p90 TPOT, when asked) meets
the SLO with no failed request. The search is `simulate_policy` runs, nothing else: double the
pool from a start until it meets, then bisect between the last pool that missed and the first
that met, so the answer comes with its witness one backend smaller that misses::

    pools tried   1 (miss)  2 (miss)  4 (meets)  3 (miss)   -> 4 backends; 3 does not

This assumes that more backends never hurt (true of every policy here up to noise: a bigger
pool of a cache-aware policy may spread a hot prefix thinner, which the witness would show).
Beside each answer: the run's hit ratio, the ideal hit ratio (one infinite cache) and the LRU
bound at that pool's total KV capacity (`analyze`): what routing could reach at that size.

`check` answers how far to trust the plan: the recorded trace simulated on the pool size and
policy it was recorded on, its TTFT distribution beside the TTFTs the router measured live.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.sim.engine import EngineConfig
from backends.sim.perf import Profile
from router.replay.analyze import ideal_hit_ratio, lru_hit_ratio
from router.replay.metrics import RequestOutcome, percentile
from router.replay.recording import LiveView
from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace

__all__ = [
    "PlanConfig",
    "PlanPoint",
    "Probe",
    "backends_needed",
    "check",
    "format_plan",
    "plan",
    "plot_plan",
    "with_host_cache",
]

# a host tier as the bundled HiCache profile has it: 4x the device pool, ~25 GB/s effective
_HOST_RATIO = 4
_H2D_BYTES_PER_S = 25e9


def with_host_cache(profile: Profile) -> Profile:
    """`profile` with a HiCache host tier (unchanged if it has one)."""
    if profile.has_host_tier:
        return profile
    return dataclasses.replace(
        profile,
        name=f"{profile.name}+host",
        host_capacity_tokens=_HOST_RATIO * profile.kv_capacity_tokens,
        h2d_bytes_per_s=_H2D_BYTES_PER_S,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanConfig:
    profile: Profile
    slo_ttft_p90: float
    slo_tpot_p90: float | None = None
    max_backends: int = 256
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not (self.slo_ttft_p90 > 0 and math.isfinite(self.slo_ttft_p90)):
            raise ValueError("slo_ttft_p90 must be a positive number")
        if self.slo_tpot_p90 is not None and not self.slo_tpot_p90 > 0:
            raise ValueError("slo_tpot_p90 must be positive")
        if self.max_backends < 1:
            raise ValueError("max_backends must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """One simulated pool: its p90s, failures and hit ratio, and whether it meets the SLOs."""

    backends: int
    ttft_p90: float
    tpot_p90: float
    failed: int
    hit_ratio: float
    meets: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanPoint:
    policy: str
    growth: float
    backends: int | None  # None: not met within max_backends
    meets: Probe | None
    one_fewer: Probe | None  # None when one backend already meets
    lru_bound_hit_ratio: float | None  # one LRU cache of the answer's total KV capacity
    probes: tuple[Probe, ...]


def _p90(values: Sequence[float]) -> float:
    return percentile(sorted(values), 90) if values else math.nan


def _probe(trace: Trace, policy: str, growth: float, n: int, cfg: PlanConfig) -> Probe:
    sim = SimConfig(profiles=(cfg.profile,) * n, load=growth, seed=cfg.seed, engine=cfg.engine)
    run = simulate_policy(trace, policy, sim)
    s = run.summary
    ttft = float(s["ttft_p90"])
    tpot = _p90([o.tpot for o in run.outcomes if o.tpot is not None])
    meets = s["failed"] == 0 and ttft <= cfg.slo_ttft_p90
    if cfg.slo_tpot_p90 is not None:
        meets = meets and (math.isnan(tpot) or tpot <= cfg.slo_tpot_p90)
    return Probe(
        backends=n,
        ttft_p90=ttft,
        tpot_p90=tpot,
        failed=int(s["failed"]),
        hit_ratio=float(s["hit_ratio"]),
        meets=meets,
    )


def backends_needed(
    trace: Trace,
    policy: str,
    growth: float,
    cfg: PlanConfig,
    *,
    start: int = 1,
    on_probe: Callable[[Probe], None] | None = None,
) -> PlanPoint:
    """The smallest pool meeting the SLOs at `growth`, found by doubling then bisection."""
    tried: dict[int, Probe] = {}

    def at(n: int) -> Probe:
        if n not in tried:
            tried[n] = _probe(trace, policy, growth, n, cfg)
            if on_probe is not None:
                on_probe(tried[n])
        return tried[n]

    lo, hi = 0, None  # lo misses (0 backends always does), hi meets
    n = max(1, min(start, cfg.max_backends))
    while hi is None:
        if at(n).meets:
            hi = n
        else:
            lo = n
            if n >= cfg.max_backends:
                break
            n = min(2 * n, cfg.max_backends)
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid).meets:
                hi = mid
            else:
                lo = mid
    probes = tuple(tried[k] for k in sorted(tried))
    if hi is None:
        return PlanPoint(
            policy=policy,
            growth=growth,
            backends=None,
            meets=None,
            one_fewer=tried.get(cfg.max_backends),
            lru_bound_hit_ratio=None,
            probes=probes,
        )
    return PlanPoint(
        policy=policy,
        growth=growth,
        backends=hi,
        meets=tried[hi],
        one_fewer=tried.get(hi - 1),
        lru_bound_hit_ratio=lru_hit_ratio(trace, hi * cfg.profile.kv_capacity_tokens),
        probes=probes,
    )


def plan(
    trace: Trace,
    policies: Sequence[str],
    growths: Sequence[float],
    cfg: PlanConfig,
    *,
    on_probe: Callable[[str, float, Probe], None] | None = None,
) -> dict[str, Any]:
    """Every policy at every growth factor: the JSON document `prefix-router plan` writes."""
    points: dict[str, list[dict[str, Any]]] = {}
    for policy in policies:
        start = 1
        rows: list[dict[str, Any]] = []
        for growth in sorted(growths):
            report = None if on_probe is None else _bind(on_probe, policy, growth)
            point = backends_needed(trace, policy, growth, cfg, start=start, on_probe=report)
            if point.backends is not None:
                start = point.backends  # more load never needs fewer backends
            rows.append(_point_json(point))
        points[policy] = rows
    return {
        "trace": trace.name,
        "requests": len(trace.requests),
        "duration_s": trace.duration(),
        "block_size": trace.block_size,
        "profile": cfg.profile.name,
        "kv_tokens_per_backend": cfg.profile.kv_capacity_tokens,
        "host_tokens_per_backend": cfg.profile.host_capacity_tokens,
        "slo_ttft_p90": cfg.slo_ttft_p90,
        "slo_tpot_p90": cfg.slo_tpot_p90,
        "ideal_hit_ratio": ideal_hit_ratio(trace),
        "plan": points,
    }


def _bind(
    report: Callable[[str, float, Probe], None], policy: str, growth: float
) -> Callable[[Probe], None]:
    return lambda probe: report(policy, growth, probe)


def _probe_json(p: Probe | None) -> dict[str, Any] | None:
    return None if p is None else dataclasses.asdict(p)


def _point_json(p: PlanPoint) -> dict[str, Any]:
    return {
        "growth": p.growth,
        "backends": p.backends,
        "meets": _probe_json(p.meets),
        "one_fewer": _probe_json(p.one_fewer),
        "hit_ratio": p.meets.hit_ratio if p.meets else None,
        "lru_bound_hit_ratio": p.lru_bound_hit_ratio,
        "probes": [_probe_json(x) for x in p.probes],
    }


def format_plan(doc: Mapping[str, Any]) -> str:
    """The plan as a table: one row per policy and growth factor."""
    head = ["policy", "growth", "backends", "p90 TTFT", "one fewer", "hit", "LRU bound", "ideal"]
    rows: list[list[str]] = []
    for policy, points in doc["plan"].items():
        for p in points:
            meets, fewer = p["meets"] or {}, p["one_fewer"] or {}
            rows.append(
                [
                    policy,
                    f"{p['growth']:g}x",
                    "-" if p["backends"] is None else str(p["backends"]),
                    _sec(meets.get("ttft_p90")),
                    _sec(fewer.get("ttft_p90"), fewer.get("failed")),
                    _ratio(p["hit_ratio"]),
                    _ratio(p["lru_bound_hit_ratio"]),
                    _ratio(doc["ideal_hit_ratio"]),
                ]
            )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"{doc['trace']}: {doc['requests']} requests over {doc['duration_s']:.0f} s on "
        f"{doc['profile']}; p90 TTFT <= {doc['slo_ttft_p90']:g} s"
        + (f", p90 TPOT <= {doc['slo_tpot_p90']:g} s" if doc["slo_tpot_p90"] else "")
    ]
    for r in [head, *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _sec(value: Any, failed: Any = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f} s" + (f" ({failed} failed)" if failed else "")


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot_plan(doc: Mapping[str, Any], path: str | Path) -> None:
    """Backends needed against load (growth x the trace's rate), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for policy, points in doc["plan"].items():
        xs = [p["growth"] for p in points if p["backends"] is not None]
        ys = [p["backends"] for p in points if p["backends"] is not None]
        ax.plot(xs, ys, marker="o", label=policy, linewidth=1.6)
    ax.set_xlabel("load (x the trace's arrival rate)")
    ax.set_ylabel("backends needed")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    slo = f"p90 TTFT <= {doc['slo_ttft_p90']:g} s"
    ax.set_title(f"{doc['trace']} on {doc['profile']}: backends for {slo}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered) if ordered else math.nan,
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
    }


def check(
    trace: Trace, live: LiveView, policy: str, backends: int, cfg: PlanConfig
) -> tuple[dict[str, Any], list[RequestOutcome]]:
    """The recorded trace simulated on its recorded pool and policy, beside the live TTFTs."""
    sim = SimConfig(profiles=(cfg.profile,) * backends, seed=cfg.seed, engine=cfg.engine)
    run = simulate_policy(trace, policy, sim)
    simulated = _stats([o.ttft for o in run.outcomes if o.ttft is not None])
    measured = _stats(live.ttfts)
    ratio = simulated["mean"] / measured["mean"] if measured["count"] else math.nan
    doc = {
        "trace": trace.name,
        "policy": policy,
        "backends": backends,
        "profile": cfg.profile.name,
        "requests": len(trace.requests),
        "live_failed": live.failed,
        "simulated_failed": int(run.summary["failed"]),
        "simulated_hit_ratio": float(run.summary["hit_ratio"]),
        "ttft_simulated": simulated,
        "ttft_live": measured,
        "mean_ratio_simulated_over_live": ratio,
    }
    return doc, run.outcomes
