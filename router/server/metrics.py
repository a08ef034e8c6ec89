"""The router's Prometheus series, exposed through `prometheus_client`.

Each metric is a custom collector (prometheus_client's `Collector`) in the app's own
`CollectorRegistry` (never the process-global one, so two routers in one process, as in the
tests, keep separate series). On the hot path a metric is plain numbers in a dict keyed by
label values: `metric.inc(*label_values, amount=...)` is a dict update, a histogram's
`observe` one bisection and two list updates. The library's own metric objects cost ~15 us per
request in all (a lock, observability checks and a Python loop over the buckets per update,
about 3% of a short request's router CPU, issue 13); here the same updates cost ~5 us, and
the library builds the families only at a scrape (`collect()`), in the same text, sample for
sample, its Counter / Gauge / Histogram classes write (tests/test_server_metrics_text.py).
Gauges that mirror live state (backend health, in-flight) are refreshed by collector
callbacks just before rendering, so they are never stale and cost nothing between scrapes;
totals another component counts itself (remote events) are mirrored at scrape time as
counters. `_created` series are off: nothing here reads them.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


class _Family(Collector):
    """One metric's values by label set, as plain numbers; rendered by `collect()`."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _check(self, labels: LabelValues) -> None:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")


_F = TypeVar("_F", CounterMetricFamily, GaugeMetricFamily)


class _Scalar(_Family):
    """One number per label set: what counters and gauges share."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def _add(self, labels: LabelValues, amount: float) -> None:
        values = self.values
        if labels in values:  # hot path: several calls per request
            values[labels] += amount
        else:
            self._check(labels)
            values[labels] = float(amount)

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def _fill(self, family: _F) -> _F:
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class Counter(_Scalar):
    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        base = name.removesuffix("_total")
        super().__init__(base + "_total", help_text, labels)
        self._base = base

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._add(labels, amount)

    def total(self) -> float:
        """The sum over every label set (the hit ratios' numerators)."""
        return sum(self.values.values())

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield self._fill(CounterMetricFamily(self._base, self.help, labels=self.label_names))


class Gauge(_Scalar):
    """Set at scrape time by collectors; `clear` forgets label sets of vanished backends."""

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self._add(labels, amount)

    def set(self, *labels: str, value: float) -> None:
        self._check(labels)
        self.values[labels] = float(value)

    def clear(self) -> None:
        if self.label_names:
            self.values.clear()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield self._fill(GaugeMetricFamily(self.name, self.help, labels=self.label_names))


class Histogram(_Family):
    """Counts per bucket (upper bounds inclusive, as Prometheus has them) and the sum."""

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets)) or TTFT_BUCKETS
        self._les = [floatToGoString(b) for b in (*self.buckets, math.inf)]  # type: ignore[no-untyped-call]
        # per label set: a count per bucket (the last one +Inf), then the sum
        self._states: dict[LabelValues, list[float]] = {} if labels else {(): self._empty()}

    def _empty(self) -> list[float]:
        return [0.0] * (len(self.buckets) + 2)

    def observe(self, *labels: str, value: float) -> None:
        state = self._states.get(labels)
        if state is None:
            self._check(labels)
            state = self._states[labels] = self._empty()
        state[bisect_left(self.buckets, value)] += 1
        state[-1] += value

    def count(self, *labels: str) -> int:
        state = self._states.get(labels)
        return 0 if state is None else int(sum(state[:-1]))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.help, labels=self.label_names)
        signed = self.buckets[0] < 0  # no _sum then, but still a _count (as the library has)
        for labels, state in self._states.items():
            cumulative = list(accumulate(state[:-1]))
            family.add_metric(labels, list(zip(self._les, cumulative, strict=True)), state[-1])
            if signed:
                named = dict(zip(self.label_names, labels, strict=True))
                family.samples.append(Sample(self.name + "_count", named, cumulative[-1]))
        yield family


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
        self.registry.register(metric)
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
