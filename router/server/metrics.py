"""The router's Prometheus series, exposed through `prometheus_client`.

Each metric is a thin wrapper over a `prometheus_client` metric in the app's own
`CollectorRegistry` (never the process-global one, so two routers in one process, as in the
tests, keep separate series). The wrappers keep the call shape the proxy uses on its hot path,
`metric.inc(*label_values, amount=...)`, and cache each label set's child, so a request pays a
dict lookup and the library's locked increment, not a `labels()` call per update
(benchmarks/metrics_cost.py measured the switch against the hand-written exposition this
replaced: within 5% of router CPU per request). Gauges that mirror live state (backend health,
in-flight) are refreshed by collector callbacks just before rendering, so they are never stale
and cost nothing between scrapes; totals another component counts itself (remote events) are
mirrored at scrape time as counters. `_created` series are off: nothing here reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "CACHED_ERROR_BUCKETS",
    "DISPATCH_BUCKETS",
    "REGRET_BUCKETS",
    "TTFT_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "MirroredCounter",
    "Registry",
    "RouterMetrics",
]

LabelValues = tuple[str, ...]

TTFT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Arrival to upstream send: a millisecond or two, unless the router queues (scheduler, CPU).
DISPATCH_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
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


class _Wrapped:
    """One prometheus_client metric (`self.metric`) and its children by label values."""

    def __init__(self, metric: Any, labels: Sequence[str]) -> None:
        self.metric = metric
        self.name: str = metric._name
        self.label_names = tuple(labels)
        self._children: dict[LabelValues, Any] = {}

    def _child(self, labels: LabelValues) -> Any:
        child = self._children.get(labels)
        if child is None:
            if len(labels) != len(self.label_names):
                raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
            child = self.metric.labels(*labels) if labels else self.metric
            self._children[labels] = child
        return child

    def _sample(self, suffix: str, labels: Sequence[str]) -> float:
        want = dict(zip(self.label_names, (str(v) for v in labels), strict=True))
        for family in self.metric.collect():
            for sample in family.samples:
                if sample.name == self.name + suffix and sample.labels == want:
                    return float(sample.value)
        return 0.0

    def total(self, suffix: str = "") -> float:
        """The sum of one sample kind over every label set (the hit ratios' numerators)."""
        return sum(
            float(s.value)
            for family in self.metric.collect()
            for s in family.samples
            if s.name == self.name + suffix
        )


class Counter(_Wrapped):
    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(prometheus_client.Counter(name, help_text, labels, registry=None), labels)
        self.name = name if name.endswith("_total") else name + "_total"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        child = self._children.get(labels)  # hot path: several calls per request
        if child is None:
            child = self._child(labels)
        child.inc(amount)

    def get(self, *labels: str) -> float:
        return self._sample("", labels)


class Gauge(_Wrapped):
    """Set at scrape time by collectors; `clear` forgets label sets of vanished backends."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(prometheus_client.Gauge(name, help_text, labels, registry=None), labels)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._child(labels)
        child.inc(amount)

    def set(self, *labels: str, value: float) -> None:
        self._child(labels).set(value)

    def get(self, *labels: str) -> float:
        return self._sample("", labels)

    def clear(self) -> None:
        if self.label_names:
            self.metric.clear()
            self._children.clear()


class Histogram(_Wrapped):
    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        bounds = tuple(sorted(buckets)) or TTFT_BUCKETS
        super().__init__(
            prometheus_client.Histogram(name, help_text, labels, buckets=bounds, registry=None),
            labels,
        )
        self.buckets = bounds

    def observe(self, *labels: str, value: float) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._child(labels)
        child.observe(value)

    def count(self, *labels: str) -> int:
        return int(self._sample("_count", labels))


class MirroredCounter(Collector):
    """A counter whose total another component keeps (read by a collector at scrape)."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.value = 0.0

    def set_total(self, *, value: float) -> None:
        self.value = value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.help, value=self.value)


_M = TypeVar("_M", Counter, Gauge, Histogram, MirroredCounter)


class Registry:
    """The app's own CollectorRegistry, plus callbacks run before each render."""

    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.collectors: list[Callable[[], None]] = []

    def register(self, metric: _M) -> _M:
        """Add `metric`; a name registered twice raises ValueError (from the library)."""
        self.registry.register(metric if isinstance(metric, MirroredCounter) else metric.metric)
        return metric

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        return generate_latest(self.registry).decode()


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
                "Time from the request's arrival to its first upstream event, by backend.",
                ("backend",),
                TTFT_BUCKETS,
            )
        )
        self.dispatch = r.register(
            Histogram(
                "prefix_router_dispatch_seconds",
                "Time from the request's arrival to its upstream send: parsing, tokenizing, "
                "routing, the scheduler's wait and the event loop's queue. The rest of "
                "prefix_router_ttft_seconds is the engine's and the way back.",
                (),
                DISPATCH_BUCKETS,
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
        self.predicted_ttft = r.register(
            Counter(
                "prefix_router_predicted_ttft_seconds_total",
                "Predicted TTFT of the requests in prefix_router_ttft_regret_seconds, by "
                "backend: a histogram with negative buckets has no _sum, so mean regret is "
                "(ttft_seconds_sum - this) / regret count over the same window.",
                ("backend",),
            )
        )
        self.cached_error = r.register(
            Histogram(
                "prefix_router_cached_tokens_error",
                "Reported minus predicted cached tokens per request, by backend "
                "(negative: the index believed the backend held more than it did; the sum is "
                "cached_tokens_total - predicted_cached_tokens_total).",
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
            MirroredCounter(
                "prefix_router_remote_events_applied_total",
                "Other replicas' routing events applied to this replica's policy.",
            )
        )
        r.collectors.append(self._ratios)

    def _ratios(self) -> None:
        prompt = self.prompt_tokens.total()
        if prompt > 0:
            self.predicted_hit_ratio.set(value=self.predicted_cached.total() / prompt)
            self.actual_hit_ratio.set(value=self.reported_cached.total() / prompt)

    def render(self) -> str:
        return self.registry.render()
