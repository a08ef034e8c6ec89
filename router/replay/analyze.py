"""Know the workload before routing it: sizes, rate, reuse, and what a cache could save.

Three questions, all answered from the trace alone (no engine, no router):

- **Ideal hit ratio.** One cache of infinite size sees every request in order. A request hits
  its longest prefix of blocks seen before (whole blocks, so hit tokens are
  min(blocks x block_size, prompt length)); the ratio is token-weighted: sum of hit tokens
  over sum of prompt tokens. No routing can beat it.
- **Reuse gaps.** For every block a request reuses (each block of its matched prefix): the
  seconds since that block was last used, and the tokens inserted into the (infinite) cache
  in between. Counted per reused block rather than per request, because most traces share a
  short first block (a system prompt) that every request reuses a moment after the previous
  one; per request, that block would hide the conversation's own long gap. The token gap is
  what an LRU cache must hold for the reuse to hit.
- **LRU bound.** One LRU cache of C tokens (C // block_size blocks) sees the trace in order;
  its hit ratio is what a perfectly routed pool of that total capacity can approach. It is
  modelled like the simulator's radix cache at block granularity: the request's matched
  prefix is touched, its new blocks inserted, least recently used leaves evicted.

How the LRU is computed fast: touch a request's blocks deepest first and its root last, so a
parent is always more recent than any of its children. Then the least recently used block is
always a leaf, and "evict LRU leaves of the tree" is exactly "evict the LRU entry of a flat
ordered map". The cached set stays prefix-closed, so the matched prefix is the run of the
request's leading blocks present in the map. One `OrderedDict` pass per size: a fraction of a
second for the Mooncake conversation trace's 288k blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.replay.metrics import percentile
from router.replay.traces import Trace

__all__ = [
    "GPU_KV_TOKENS",
    "LruPoint",
    "Percentiles",
    "TokenStats",
    "WorkloadReport",
    "analyze",
    "default_cache_sizes",
    "format_report",
    "ideal_cached_tokens",
    "ideal_hit_ratio",
    "lru_cached_tokens",
    "lru_curve",
    "lru_hit_ratio",
]

# KV tokens of one llama3-8b-h100 backend: the unit of the default size range.
GPU_KV_TOKENS = 409_600


@dataclass(frozen=True, slots=True, kw_only=True)
class Percentiles:
    """p10/p50/p90 of a distribution (all 0.0 when there were no samples)."""

    p10: float
    p50: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        ordered = sorted(values)
        return cls(p10=_pct(ordered, 10), p50=_pct(ordered, 50), p90=_pct(ordered, 90))


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenStats:
    """Mean, p50, p99 and max of a token count."""

    mean: float
    p50: float
    p99: float
    max: int

    @classmethod
    def of(cls, values: Sequence[int]) -> TokenStats:
        ordered = sorted(values)
        mean = sum(ordered) / len(ordered) if ordered else 0.0
        return cls(
            mean=mean,
            p50=_pct(ordered, 50),
            p99=_pct(ordered, 99),
            max=ordered[-1] if ordered else 0,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LruPoint:
    """The hit ratio one LRU cache of `cache_tokens` reaches on the trace."""

    cache_tokens: int
    hit_ratio: float


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadReport:
    """Everything `analyze` finds; `to_json` gives the documented JSON shape."""

    name: str
    requests: int
    duration_s: float
    rate_rps: float
    block_size: int
    input_tokens: TokenStats
    output_tokens: TokenStats
    ideal_hit_ratio: float
    reused_blocks: int
    reuse_gap_s: Percentiles
    reuse_gap_tokens: Percentiles
    lru_bound: tuple[LruPoint, ...]

    def to_json(self) -> dict[str, Any]:
        def pct(p: Percentiles) -> dict[str, float]:
            return {"p10": p.p10, "p50": p.p50, "p90": p.p90}

        def tok(t: TokenStats) -> dict[str, float]:
            return {"mean": t.mean, "p50": t.p50, "p99": t.p99, "max": t.max}

        return {
            "trace": self.name,
            "requests": self.requests,
            "duration_s": self.duration_s,
            "rate_rps": self.rate_rps,
            "block_size": self.block_size,
            "input_tokens": tok(self.input_tokens),
            "output_tokens": tok(self.output_tokens),
            "ideal_hit_ratio": self.ideal_hit_ratio,
            "reused_blocks": self.reused_blocks,
            "reuse_gap_s": pct(self.reuse_gap_s),
            "reuse_gap_tokens": pct(self.reuse_gap_tokens),
            "lru_bound": [
                {"cache_tokens": p.cache_tokens, "hit_ratio": p.hit_ratio} for p in self.lru_bound
            ],
        }


def default_cache_sizes() -> tuple[int, ...]:
    """Log-spaced from a quarter of one GPU's KV pool to 64 GPUs' (8 GPUs' included)."""
    return tuple(int(GPU_KV_TOKENS * 2.0**k) for k in range(-2, 7))


def ideal_hit_ratio(trace: Trace) -> float:
    """Token-weighted hit ratio of one infinite cache that saw the trace in order."""
    return _token_ratio(trace, ideal_cached_tokens(trace))


def lru_hit_ratio(trace: Trace, cache_tokens: int) -> float:
    """Token-weighted hit ratio of one LRU cache of `cache_tokens` (block granularity)."""
    return _token_ratio(trace, lru_cached_tokens(trace, cache_tokens))


def ideal_cached_tokens(trace: Trace) -> list[int]:
    """Each request's prompt tokens found in one infinite cache that saw the trace in order."""
    seen: set[int] = set()
    bs = trace.block_size
    out: list[int] = []
    for r in trace.requests:
        out.append(min(_leading_in(r.hash_ids, seen) * bs, r.input_length))
        seen.update(r.hash_ids)
    return out


def lru_cached_tokens(trace: Trace, cache_tokens: int) -> list[int]:
    """Each request's prompt tokens found in one LRU cache of `cache_tokens` (block granularity)."""
    if cache_tokens < 0:
        raise ValueError("cache_tokens must be non-negative")
    capacity = cache_tokens // trace.block_size
    bs = trace.block_size
    cache: OrderedDict[int, None] = OrderedDict()
    out: list[int] = []
    for r in trace.requests:
        ids = r.hash_ids
        out.append(min(_leading_in(ids, cache) * bs, r.input_length))
        # deepest first, root last: a parent is always more recent than its children
        for b in reversed(ids):
            if b in cache:
                cache.move_to_end(b)
            else:
                cache[b] = None
        while len(cache) > capacity:
            cache.popitem(last=False)
    return out


def _token_ratio(trace: Trace, cached: Sequence[int]) -> float:
    total = sum(r.input_length for r in trace.requests)
    return sum(cached) / total if total else 0.0


def lru_curve(trace: Trace, sizes: Sequence[int]) -> tuple[LruPoint, ...]:
    """The LRU bound at each size, sorted by size."""
    return tuple(
        LruPoint(cache_tokens=c, hit_ratio=lru_hit_ratio(trace, c)) for c in sorted(set(sizes))
    )


def analyze(trace: Trace, cache_tokens: Sequence[int] | None = None) -> WorkloadReport:
    """Analyze a trace; `cache_tokens` are the LRU sizes (default: `default_cache_sizes`)."""
    sizes = default_cache_sizes() if cache_tokens is None else tuple(cache_tokens)
    bs = trace.block_size
    # block -> (last time used, cumulative tokens inserted at that moment)
    last: dict[int, tuple[float, int]] = {}
    inserted = 0
    hit = total = 0
    gaps_s: list[float] = []
    gaps_tokens: list[int] = []
    for r in trace.requests:
        now = r.timestamp
        ids = r.hash_ids
        h = _leading_in(ids, last)
        for b in ids[:h]:
            t, ins = last[b]
            gaps_s.append(now - t)
            gaps_tokens.append(inserted - ins)
        hit += min(h * bs, r.input_length)
        total += r.input_length
        for k, b in enumerate(ids):
            if b not in last:
                inserted += max(0, min(bs, r.input_length - k * bs))
        mark = (now, inserted)
        for b in ids:
            last[b] = mark
    n = len(trace.requests)
    duration = trace.duration()
    return WorkloadReport(
        name=trace.name,
        requests=n,
        duration_s=duration,
        rate_rps=n / duration if duration > 0 else 0.0,
        block_size=bs,
        input_tokens=TokenStats.of([r.input_length for r in trace.requests]),
        output_tokens=TokenStats.of([r.output_length for r in trace.requests]),
        ideal_hit_ratio=hit / total if total else 0.0,
        reused_blocks=len(gaps_s),
        reuse_gap_s=Percentiles.of(gaps_s),
        reuse_gap_tokens=Percentiles.of(gaps_tokens),
        lru_bound=lru_curve(trace, sizes),
    )


def format_report(rep: WorkloadReport) -> str:
    """A readable plain-text table of a report."""
    rows = [
        f"trace            {rep.name}",
        f"requests         {rep.requests:,}",
        f"duration         {rep.duration_s:,.1f} s   ({rep.rate_rps:.2f} req/s)",
        f"block size       {rep.block_size} tokens",
        "",
        f"{'tokens':<16} {'mean':>10} {'p50':>10} {'p99':>10} {'max':>10}",
    ]
    for label, t in (("input", rep.input_tokens), ("output", rep.output_tokens)):
        rows.append(f"{label:<16} {t.mean:>10,.0f} {t.p50:>10,.0f} {t.p99:>10,.0f} {t.max:>10,}")
    g, gt = rep.reuse_gap_s, rep.reuse_gap_tokens
    rows += [
        "",
        f"ideal hit ratio  {rep.ideal_hit_ratio:.4f}   (one infinite cache, token-weighted)",
        f"reused blocks    {rep.reused_blocks:,}",
        f"{'reuse gap':<16} {'p10':>12} {'p50':>12} {'p90':>12}",
        f"{'seconds':<16} {g.p10:>12,.1f} {g.p50:>12,.1f} {g.p90:>12,.1f}",
        f"{'tokens between':<16} {gt.p10:>12,.0f} {gt.p50:>12,.0f} {gt.p90:>12,.0f}",
        "",
        "LRU bound (one LRU cache of this size; what a perfectly routed pool can approach)",
        f"{'cache tokens':>14} {'GPUs x 409,600':>15} {'hit ratio':>10}",
    ]
    for p in rep.lru_bound:
        gpus = p.cache_tokens / GPU_KV_TOKENS
        rows.append(f"{p.cache_tokens:>14,} {gpus:>15.2f} {p.hit_ratio:>10.4f}")
    return "\n".join(rows)


def _leading_in(ids: Sequence[int], present: set[int] | dict[int, Any]) -> int:
    """How many of `ids`' leading blocks are in `present` (the matched prefix, in blocks)."""
    h = 0
    for b in ids:
        if b not in present:
            break
        h += 1
    return h


def _pct(ordered: Sequence[float], q: float) -> float:
    """`metrics.percentile` of sorted values, 0.0 when empty (a report field, never NaN)."""
    return percentile(ordered, q) if ordered else 0.0
