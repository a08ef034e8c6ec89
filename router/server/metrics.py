"""A tiny Prometheus registry: counters, gauges and histograms with labels, text exposition.

We need a dozen series, not a client library: each metric keeps a dict from label values to
numbers, and `Registry.render()` writes the text format (version 0.0.4) by hand. Gauges that
mirror live state (backend health, in-flight) are refreshed by a collector callback just before
rendering, so they are never stale and cost nothing between scrapes. Single-threaded (the event
loop), so no locks.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = [
    "CACHED_ERROR_BUCKETS",
    "REGRET_BUCKETS",
    "TTFT_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "RouterMetrics",
]

LabelValues = tuple[str, ...]

TTFT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


# Regret (observed - predicted TTFT) is signed: symmetric buckets around 0.
REGRET_BUCKETS: tuple[float, ...] = (
    -10.0, -2.5, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0.0,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
# Reported - predicted cached tokens: 0 when the index was right; a block is 64 tokens.
CACHED_ERROR_BUCKETS: tuple[float, ...] = (
    -65536.0, -16384.0, -4096.0, -1024.0, -256.0, -64.0, -1.0, 0.0,
    63.0, 255.0, 1023.0, 4095.0, 16383.0, 65535.0,
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        return tuple(str(v) for v in values)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        # hot path (several calls per request): the label tuple is the key as given
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def set_total(self, *labels: str, value: float) -> None:
        """Mirror a total another component counts itself (read by a collector at scrape)."""
        self.values[self._key(labels)] = value

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
            for k, v in sorted(self.values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        self.values[self._key(labels)] = value

    def clear(self) -> None:
        self.values.clear()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets)) or TTFT_BUCKETS
        # per label set: bucket counts (non-cumulative), sum, count
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, *labels: str, value: float) -> None:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
        counts, totals = series
        counts[bisect_left(self.buckets, value)] += 1  # first bucket with value <= bound
        totals[0] += value
        totals[1] += 1

    def count(self, *labels: str) -> int:
        series = self.series.get(self._key(labels))
        return int(series[1][1]) if series else 0

    def samples(self) -> list[str]:
        out: list[str] = []
        for key, (counts, totals) in sorted(self.series.items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = f'le="{_num(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(totals[0])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(totals[1])}")
        return out


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """Metrics in registration order, plus collectors run before each render."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []
        self.collectors: list[Callable[[], None]] = []

    def register(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"


class RouterMetrics:
    """The router's series, named `prefix_router_*`; one instance per app."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.register(
            Counter(
                "prefix_router_requests_total",
                "Requests answered, by endpoint and HTTP status.",
                ("endpoint", "status"),
            )
        )
        self.errors = r.register(
            Counter(
                "prefix_router_errors_total",
                "Failures by kind (upstream_connect, upstream_5xx, stream_broken, "
                "client_disconnect, no_backend, internal).",
                ("kind",),
            )
        )
        self.retries = r.register(
            Counter("prefix_router_retries_total", "Requests re-routed to another backend.")
        )
        self.ttft = r.register(
            Histogram(
                "prefix_router_ttft_seconds",
                "Time from routing to the first upstream chunk, by backend.",
                ("backend",),
                TTFT_BUCKETS,
            )
        )
        self.regret = r.register(
            Histogram(
                "prefix_router_ttft_regret_seconds",
                "Observed TTFT minus the policy's predicted TTFT, by backend (streamed requests "
                "of policies that predict one): how wrong the cost model is, and where.",
                ("backend",),
                REGRET_BUCKETS,
            )
        )
        self.cached_error = r.register(
            Histogram(
                "prefix_router_cached_tokens_error",
                "Reported minus predicted cached tokens per request, by backend "
                "(negative: the index believed the backend held more than it did).",
                ("backend",),
                CACHED_ERROR_BUCKETS,
            )
        )
        self.routed = r.register(
            Counter(
                "prefix_router_routing_decisions_total",
                "Routing decisions, by backend.",
                ("backend",),
            )
        )
        self.prompt_tokens = r.register(
            Counter(
                "prefix_router_prompt_tokens_total",
                "Prompt tokens of finished requests (as the backend reported them), by backend.",
                ("backend",),
            )
        )
        self.predicted_cached = r.register(
            Counter(
                "prefix_router_predicted_cached_tokens_total",
                "Cached tokens the policy predicted, for requests with a reported outcome.",
                ("backend",),
            )
        )
        self.reported_cached = r.register(
            Counter(
                "prefix_router_cached_tokens_total",
                "Cached tokens the backends reported, by backend.",
                ("backend",),
            )
        )
        self.predicted_hit_ratio = r.register(
            Gauge(
                "prefix_router_predicted_hit_ratio",
                "Predicted cached / prompt tokens over all reported requests.",
            )
        )
        self.actual_hit_ratio = r.register(
            Gauge(
                "prefix_router_hit_ratio",
                "Reported cached / prompt tokens over all reported requests.",
            )
        )
        self.backend_healthy = r.register(
            Gauge("prefix_router_backend_healthy", "1 if the backend is healthy.", ("backend",))
        )
        self.backend_in_flight = r.register(
            Gauge(
                "prefix_router_backend_in_flight",
                "Requests the router has in flight at the backend.",
                ("backend",),
            )
        )
        self.in_flight = r.register(
            Gauge("prefix_router_in_flight", "Requests the router is serving now.")
        )
        self.learned_pp = r.register(
            Gauge(
                "prefix_router_learned_prefill_tokens_per_second",
                "Learned prefill speed per backend (when the policy learns one).",
                ("backend",),
            )
        )
        self.learned_tg = r.register(
            Gauge(
                "prefix_router_learned_decode_step_seconds",
                "Learned decode step time per backend (when the policy learns one).",
                ("backend",),
            )
        )
        self.replicas = r.register(
            Gauge(
                "prefix_router_replicas",
                "Router replicas alive in this replica's cluster, itself included "
                "(1 with --state memory).",
            )
        )
        self.remote_events = r.register(
            Counter(
                "prefix_router_remote_events_applied_total",
                "Other replicas' routing events applied to this replica's policy.",
            )
        )
        r.collectors.append(self._ratios)

    def _ratios(self) -> None:
        prompt = sum(self.prompt_tokens.values.values())
        if prompt > 0:
            self.predicted_hit_ratio.set(value=sum(self.predicted_cached.values.values()) / prompt)
            self.actual_hit_ratio.set(value=sum(self.reported_cached.values.values()) / prompt)

    def render(self) -> str:
        return self.registry.render()
