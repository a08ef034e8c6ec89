"""`--slo-ttft-p90 auto`: a TTFT SLO every policy can meet, relative to the trace's own floor.

A fixed p90 SLO (say 2 s) is unreachable on a trace whose long prompts alone take longer to
prefill: round-robin then has capacity 0 at any load, and "compare at round-robin's capacity"
has no load to run at. `auto` sets the SLO from the window itself::

    slo = 2 x round_robin's p90 TTFT on an idle pool (the window at load 0.05), rounded up to 10 ms

Load 0.05 spaces arrivals 20 times wider than the trace, so queues are nearly empty and what is
left is each request's own prefill (its floor, benchmarks/ttft_floor.py) plus the decode
steps it shares; round_robin because it needs no cache to be right, so the floor is not a
lucky policy's. Twice that leaves a policy the room to queue about as long as it computes.
The factor and load are the same the standard live comparison (benchmarks/live_compare.py)
has used when a fixed SLO was out of reach. Every figure reports the SLO it used.
"""

from __future__ import annotations

import math

from router.replay.simulate import SimConfig, simulate_policy
from router.replay.traces import Trace

__all__ = [
    "AUTO",
    "AUTO_FACTOR",
    "AUTO_LOAD",
    "auto_from_idle",
    "auto_slo",
    "idle_p90",
    "parse_slo",
]

AUTO = "auto"
AUTO_FACTOR = 2.0
AUTO_LOAD = 0.05


def parse_slo(text: str) -> float | None:
    """A positive number of seconds, or None for `auto`; ValueError otherwise."""
    if text.strip().lower() == AUTO:
        return None
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"--slo-ttft-p90 must be a positive number or 'auto', got {text!r}")
    return value


def idle_p90(trace: Trace, config: SimConfig) -> float:
    """round_robin's simulated p90 TTFT of `trace` at load 0.05 on `config`'s pool (s)."""
    idle = SimConfig(
        profiles=config.profiles,
        believed=config.believed,
        load=AUTO_LOAD,
        seed=config.seed,
        engine=config.engine,
    )
    return float(simulate_policy(trace, "round_robin", idle).summary["ttft_p90"])


def auto_from_idle(p90: float) -> float:
    """The auto SLO from an idle p90 (`idle_p90`): twice it, rounded up to 10 ms."""
    return math.ceil(AUTO_FACTOR * p90 * 100) / 100


def auto_slo(trace: Trace, config: SimConfig) -> float:
    """2 x round_robin's simulated p90 TTFT of `trace` at load 0.05 on `config`'s pool (s)."""
    return auto_from_idle(idle_p90(trace, config))
