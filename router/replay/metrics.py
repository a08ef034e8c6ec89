"""Per-request outcomes and the run summary every benchmark reports (DESIGN section 7).

The simulator and the HTTP replay client both produce `RequestOutcome`s; `summarize` turns them
into the JSON block the contracts fix. Latency percentiles are over completed requests only;
failures are counted, never dropped silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RequestOutcome", "json_safe", "percentile", "summarize", "write_json"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOutcome:
    """How one request went. Times are seconds; `ttft`, `tpot` and `e2e` are None if it failed."""

    rid: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    ttft: float | None
    tpot: float | None
    e2e: float | None
    backend: str | None = None
    error: str | None = None  # "HTTP 503: ..." or "aborted": set exactly when the request failed

    @property
    def failed(self) -> bool:
        return self.error is not None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending sequence (q in [0, 100]); NaN if empty."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def summarize(outcomes: Iterable[RequestOutcome], *, wall_s: float = 0.0) -> dict[str, Any]:
    """The DESIGN section 7 result block for one policy or target (plus a few extras)."""
    items = list(outcomes)
    done = [o for o in items if not o.failed]
    ttfts = sorted(o.ttft for o in done if o.ttft is not None)
    tpots = [o.tpot for o in done if o.tpot is not None]
    e2es = sorted(o.e2e for o in done if o.e2e is not None)
    prompt = sum(o.prompt_tokens for o in done)
    cached = sum(o.cached_tokens for o in done)
    output = sum(o.output_tokens for o in done)
    span = 0.0
    if done:
        start = min(o.arrival for o in done)
        end = max(o.arrival + (o.e2e or 0.0) for o in done)
        span = max(end - start, 1e-9)
    return {
        "requests": len(items),
        "completed": len(done),
        "failed": len(items) - len(done),
        "ttft_mean": _mean(ttfts),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99),
        "tpot_mean": _mean(tpots),
        "e2e_mean": _mean(e2es),
        "e2e_p90": percentile(e2es, 90),
        "hit_ratio": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "output_tokens_per_s": output / span if span else 0.0,
        "requests_per_s": len(done) / span if span else 0.0,
        "wall_s": wall_s,
    }


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so strict JSON can hold it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, doc: Any, *, indent: int | None = 2) -> None:
    """Write `doc` as strict JSON (NaN and infinities as null), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(doc), indent=indent, allow_nan=False) + "\n")
