"""`serve --explain`: say why each request went where it went, in one header and one log line.

The cost policy already prices every backend by named terms (router.core.cost_policy); its
`Choice.explain` keeps the chosen backend's terms and the runner-up's predicted TTFT, and this
module only formats them. The `x-route-reason` value is `key=value` pairs joined by `; `::

    backend=http://b:30000; ttft=0.231000; queue=0.120000; prefill=0.104000; decode=0.007000;
    cached=1024; runner_up=http://c:30000; runner_up_ttft=0.402000

Times are predicted seconds (queue + prefill + decode = ttft; decode is the decode step the
prefill's step carries when the backend was decoding). A policy with no cost model (round_robin,
cache_aware...) gets `backend=...; reason=<its own reason>`; a lone backend has no runner-up.
"""

from __future__ import annotations

from router.core.routing import Decision

__all__ = ["HEADER", "parse_route_reason", "route_reason"]

HEADER = "x-route-reason"


def route_reason(decision: Decision) -> str:
    """The x-route-reason value of one routing decision."""
    parts = [f"backend={decision.backend}"]
    ex = decision.explain
    if ex is None:
        if decision.reason:
            parts.append(f"reason={decision.reason}")
        return "; ".join(parts)
    parts += [
        f"ttft={ex.ttft_s:.6f}",
        f"queue={ex.queue_s:.6f}",
        f"prefill={ex.prefill_s:.6f}",
        f"decode={ex.decode_s:.6f}",
        f"cached={ex.cached_tokens}",
    ]
    if ex.runner_up is not None and ex.runner_up_ttft_s is not None:
        parts += [f"runner_up={ex.runner_up}", f"runner_up_ttft={ex.runner_up_ttft_s:.6f}"]
    return "; ".join(parts)


def parse_route_reason(value: str) -> dict[str, str]:
    """The pairs of an x-route-reason value (for clients, dashboards' log parsers and tests)."""
    out: dict[str, str] = {}
    for part in value.split("; "):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"not a key=value pair: {part!r}")
        out[key] = val
    return out
