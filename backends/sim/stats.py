"""Counters of a simulated SGLang server and their Prometheus rendering (`sglang:*` names).

`ServerStats` is updated by the server when a request gets its first token, finishes or is
aborted; `render_metrics` writes the Prometheus text exposition that `/metrics` serves, with
the metric names SGLang uses (gauges for the current load, counters for tokens, histograms
for TTFT and end-to-end latency), every sample labelled `model_name`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from backends.sim.api import EngineLoad

__all__ = ["E2E_BUCKETS", "TTFT_BUCKETS", "Histogram", "ServerStats", "render_metrics"]

TTFT_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
E2E_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(slots=True)
class Histogram:
    """A cumulative Prometheus histogram."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


@dataclass(slots=True)
class ServerStats:
    """What one server has done since it started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    aborted: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    recent_gen: deque[tuple[float, int]] = field(default_factory=deque)

    def finished(self, *, at: float, prompt: int, cached: int, output: int, e2e_s: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.generation_tokens += output
        self.recent_gen.append((at, output))
        self.e2e.observe(e2e_s)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)

    def gen_throughput(self, now: float, window: float = 10.0) -> float:
        """Output tokens per second over the last `window` seconds (of finished requests)."""
        while self.recent_gen and self.recent_gen[0][0] < now - window:
            self.recent_gen.popleft()
        return sum(n for _, n in self.recent_gen) / window


def _hist_lines(name: str, help_: str, h: Histogram, model: str) -> list[str]:
    lines = [f"# HELP sglang:{name} {help_}", f"# TYPE sglang:{name} histogram"]
    for b, c in zip(h.buckets, h.counts, strict=True):
        lines.append(f'sglang:{name}_bucket{{le="{b}",model_name="{model}"}} {float(c)}')
    lines.append(f'sglang:{name}_bucket{{le="+Inf",model_name="{model}"}} {float(h.n)}')
    lines.append(f'sglang:{name}_sum{{model_name="{model}"}} {h.total}')
    lines.append(f'sglang:{name}_count{{model_name="{model}"}} {float(h.n)}')
    return lines


def render_metrics(stats: ServerStats, load: EngineLoad, model: str, now: float) -> str:
    """The Prometheus text for `/metrics`."""
    cap = max(load.kv_capacity_tokens, 1)
    samples: Sequence[tuple[str, str, str, float]] = (
        ("num_running_reqs", "gauge", "The number of running requests.", load.running),
        ("num_queue_reqs", "gauge", "The number of requests in the waiting queue.", load.waiting),
        ("num_used_tokens", "gauge", "The number of used tokens.", load.kv_used_tokens),
        ("token_usage", "gauge", "The token usage.", load.kv_used_tokens / cap),
        ("max_total_num_tokens", "gauge", "Maximum total number of tokens.", cap),
        ("cache_hit_rate", "gauge", "The prefix cache hit rate.", stats.cache_hit_rate),
        ("gen_throughput", "gauge", "The generation throughput (token/s).",
         stats.gen_throughput(now)),
        ("prompt_tokens_total", "counter", "Number of prefill tokens processed.",
         stats.prompt_tokens),
        ("generation_tokens_total", "counter", "Number of generation tokens processed.",
         stats.generation_tokens),
        ("cached_tokens_total", "counter", "Number of cached prompt tokens.",
         stats.cached_tokens),
        ("num_requests_total", "counter", "Number of requests processed.", stats.requests),
        ("num_aborted_requests_total", "counter", "Number of requests aborted.", stats.aborted),
    )  # fmt: skip
    lines: list[str] = []
    for name, kind, help_, value in samples:
        lines.append(f"# HELP sglang:{name} {help_}")
        lines.append(f"# TYPE sglang:{name} {kind}")
        lines.append(f'sglang:{name}{{model_name="{model}"}} {float(value)}')
    lines += _hist_lines(
        "time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        stats.ttft,
        model,
    )
    lines += _hist_lines(
        "e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        stats.e2e,
        model,
    )
    return "\n".join(lines) + "\n"
