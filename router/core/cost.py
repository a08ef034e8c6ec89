"""Each backend's two speeds, calibrated online, and the latency a request would see there.

`PerfModel` holds two linear models, both starting from the backend's `PerfPrior`:

    prefill_time(new, ctx) = a * new + b * pairs(new, ctx)  (a = 1 / PP tokens per second;
                                                             pairs: causal attention pairs)
    decode_step_time(kv)   = s0 + s1 * kv                   (TG: one step of the running batch)

Each is refitted from a sliding window of observations (TTFT minus estimated queueing against
uncached tokens; inter-token gaps against the batch's KV tokens). The fit is robust, because
these observations are noisy and sometimes wild (a TTFT that hid a queue, a stall):

1. errors are relative (weight 1/prediction^2): a 10 ms miss on a 20 ms step matters as much as
   a 1 s miss on a 2 s prefill;
2. iteratively reweighted least squares with Huber weights at 1.5 robust sigmas (sigma from
   the median absolute relative residual), and observations beyond 6 sigmas ignored;
3. a ridge pull toward the prior's speed (3 observations' worth) and, for the second term,
   toward the prior's shape, its ratio to the first (16 observations' worth for prefill, whose
   two terms noisy TTFTs barely tell apart; 3 for decode), so an unexcited direction (every
   prompt the same length) stays at the prior instead of wandering;
4. coefficients are kept non-negative (the per-token terms) and positive (a and s0).

Refits over the window (default 128 observations, two IRLS passes) run on every observation
for the first 32, then every 32, so observing costs ~30 us amortised on a slow core and
predicting is two multiply-adds (~1 us).

`OutputLengthModel` gives the expected output length of a request: the expectation of
min(N, max_tokens) over a window of observed output lengths N, i.e. max_tokens capped by what
requests typically produce.

The cost formula itself lives with the policy that uses it (`router/core/cost_policy.py`),
whose per-backend loop is the router's hot path.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from itertools import accumulate

from router.core.model import PerfPrior, attention_pairs

__all__ = [
    "OutputLengthModel",
    "PerfModel",
]

_HUBER = 1.5  # robust sigmas at which Huber weights start to fall
_REJECT = 6.0  # robust sigmas beyond which an observation is ignored
_MIN_SIGMA = 0.01  # relative; keeps a perfect fit from rejecting everything
_EAGER_FITS = 32  # refit on every observation until this many
_REFIT_EVERY = 32
_ITERATIONS = 2  # IRLS passes per refit (each starts from the last fit, so few suffice)


class _RobustLine:
    """y = c1 * x1 + c2 * x2 (c1 > 0, c2 >= 0) fitted robustly on a window; see module doc."""

    __slots__ = (
        "_since",
        "c1",
        "c2",
        "count",
        "p1",
        "p2",
        "prior_weight",
        "shape_weight",
        "window",
    )

    def __init__(
        self, p1: float, p2: float, *, window: int, prior_weight: float, shape_weight: float
    ) -> None:
        self.p1, self.p2 = p1, p2
        self.c1, self.c2 = p1, p2
        # (x1, x2, y, weight): an aggregate of k observations counts k times
        self.window: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self.prior_weight = prior_weight
        self.shape_weight = shape_weight
        self.count = 0
        self._since = 0

    def predict(self, x1: float, x2: float) -> float:
        return self.c1 * x1 + self.c2 * x2

    def observe(self, x1: float, x2: float, y: float, weight: float = 1.0) -> bool:
        """Add an observation; True when it refitted the line (c1, c2 may have changed)."""
        if not (math.isfinite(y) and y > 0 and x1 > 0 and x2 >= 0 and weight > 0):
            return False  # a non-positive duration carries no information about speed
        self.window.append((x1, x2, y, weight))
        self.count += 1
        self._since += 1
        if self.count <= _EAGER_FITS or self._since >= _REFIT_EVERY:
            self._fit()
            self._since = 0
            return True
        return False

    def _fit(self) -> None:
        obs = self.window
        n = len(obs)
        m1 = sum(o[0] for o in obs) / n
        m2 = sum(o[1] for o in obs) / n
        ybar = sum(o[2] for o in obs) / n
        # Ridge in relative-contribution units (a change dc moves a typical prediction by
        # dc * m / ybar): c1 is pulled toward the prior, c2 toward the prior's *shape*
        # (c2 / c1 = p2 / p1), since a profile knows the attention-vs-linear split better
        # than the absolute speed, and noisy data barely tells the two terms apart.
        r1 = self.prior_weight * (m1 / ybar) ** 2
        r2 = self.shape_weight * (m2 / ybar) ** 2
        rho = self.p2 / self.p1
        c1, c2 = self.c1, self.c2
        for _ in range(_ITERATIONS):
            preds = [max(c1 * x1 + c2 * x2, 1e-12) for x1, x2, _, _ in obs]
            rel = [(y - p) / p for (_, _, y, _), p in zip(obs, preds, strict=True)]
            sigma = max(1.4826 * _median([abs(r) for r in rel]), _MIN_SIGMA)
            s11 = s12 = s22 = t1 = t2 = 0.0
            for (x1, x2, y, k), p, r in zip(obs, preds, rel, strict=True):
                z = abs(r) / sigma
                if z > _REJECT:
                    continue
                w = k * (1.0 if z <= _HUBER else _HUBER / z) / (p * p)
                s11 += w * x1 * x1
                s12 += w * x1 * x2
                s22 += w * x2 * x2
                t1 += w * x1 * y
                t2 += w * x2 * y
            c1, c2 = _solve_nonneg(
                s11 + r1 + r2 * rho * rho, s12 - r2 * rho, s22 + r2, t1 + r1 * self.p1, t2, self.p1
            )
        self.c1, self.c2 = c1, c2


def _solve_nonneg(
    s11: float, s12: float, s22: float, t1: float, t2: float, p1: float
) -> tuple[float, float]:
    """Minimise the quadratic with c2 >= 0 and c1 >= 1% of its prior."""
    floor = p1 * 0.01
    det = s11 * s22 - s12 * s12
    if det > 0:
        c1 = (t1 * s22 - t2 * s12) / det
        c2 = (s11 * t2 - s12 * t1) / det
        if c2 >= 0 and c1 >= floor:
            return c1, c2
    # on a boundary: c2 = 0, or c1 at its floor
    cand: list[tuple[float, float]] = []
    if s11 > 0:
        cand.append((max(t1 / s11, floor), 0.0))
    if s22 > 0:
        cand.append((floor, max((t2 - s12 * floor) / s22, 0.0)))
    if not cand:
        return p1, 0.0

    def loss(c: tuple[float, float]) -> float:
        a, b = c
        return a * a * s11 + 2 * a * b * s12 + b * b * s22 - 2 * (a * t1 + b * t2)

    return min(cand, key=loss)


def _median(values: list[float]) -> float:
    values.sort()
    k = len(values)
    mid = k // 2
    return values[mid] if k % 2 else 0.5 * (values[mid - 1] + values[mid])


class PerfModel:
    """One backend's prefill and decode-step models, starting at the prior, learned online."""

    def __init__(
        self,
        prior: PerfPrior,
        *,
        window: int = 128,
        prior_weight: float = 3.0,
        prefill_shape_weight: float = 16.0,
    ) -> None:
        """The weights are worth that many observations (module doc).

        Prefill's two features (new, new * ctx) are nearly collinear in real traffic, so its
        split is held to the prior's shape more firmly than decode's (1, kv), which traffic
        separates well.
        """
        if window < 8:
            raise ValueError("window must be at least 8 observations")
        if prior_weight < 0 or prefill_shape_weight < 0:
            raise ValueError("prior_weight and prefill_shape_weight must be non-negative")
        self.prior = prior
        # Refits of either line: the coefficients change only then, so a cache of values
        # derived from `learned()` checks one int (the cost policy's hot loop, `learned()`
        # itself). Counting every observation instead rebuilt both after each stream (its
        # decode step is observed) although 31 in 32 leave the fit as it was.
        self.updates = 0
        self._learned: tuple[int, PerfPrior] | None = None  # (updates, learned())
        self._prefill = _RobustLine(
            1.0 / prior.prefill_tokens_per_s,
            prior.prefill_s_per_token_ctx,
            window=window,
            prior_weight=prior_weight,
            shape_weight=prefill_shape_weight,
        )
        self._decode = _RobustLine(
            prior.decode_step_s,
            prior.decode_s_per_kv_token,
            window=window,
            prior_weight=prior_weight,
            shape_weight=prior_weight,
        )

    def prefill_time(self, new_tokens: int, context_tokens: int) -> float:
        """Seconds to prefill `new_tokens` uncached tokens of a `context_tokens` prompt."""
        if new_tokens <= 0:
            return 0.0
        return self._prefill.predict(new_tokens, attention_pairs(new_tokens, context_tokens))

    def decode_step_time(self, batch_kv_tokens: int) -> float:
        """Seconds per decode step of a batch holding `batch_kv_tokens` KV tokens."""
        return self._decode.predict(1.0, max(batch_kv_tokens, 0))

    def observe_prefill(self, new_tokens: int, context_tokens: int, seconds: float) -> None:
        """A prefill of `new_tokens` (of `context_tokens`) took `seconds` (queueing removed)."""
        if new_tokens > 0 and self._prefill.observe(
            new_tokens, attention_pairs(new_tokens, context_tokens), seconds
        ):
            self.updates += 1

    def observe_prefill_total(
        self, new_tokens: int, pairs: int, seconds: float, *, count: int = 1
    ) -> None:
        """`count` prefills took `seconds` together: sums of new tokens and attention pairs.

        The model is linear in (new, pairs), so sums over requests are one valid
        observation; it weighs as much as the `count` it stands for.
        """
        if new_tokens > 0 and self._prefill.observe(
            new_tokens, max(pairs, new_tokens), seconds, max(count, 1)
        ):
            self.updates += 1

    def observe_decode(self, batch_kv_tokens: int, step_seconds: float) -> None:
        """A decode step with `batch_kv_tokens` KV tokens in the batch took `step_seconds`."""
        if self._decode.observe(1.0, max(batch_kv_tokens, 0), step_seconds):
            self.updates += 1

    @property
    def prefill_observations(self) -> int:
        return self._prefill.count

    @property
    def decode_observations(self) -> int:
        return self._decode.count

    def learned(self) -> PerfPrior:
        """The current estimate, in the prior's terms (what /stats and /metrics show); one
        object per fit (a `PerfPrior` is frozen), not one per call."""
        cached = self._learned
        if cached is not None and cached[0] == self.updates:
            return cached[1]
        learned = PerfPrior(
            prefill_tokens_per_s=1.0 / self._prefill.c1,
            prefill_s_per_token_ctx=self._prefill.c2,
            decode_step_s=self._decode.c1,
            decode_s_per_kv_token=self._decode.c2,
        )
        self._learned = (self.updates, learned)
        return learned


class OutputLengthModel:
    """Expected output tokens: E[min(N, max_tokens)] over recently observed lengths N."""

    def __init__(self, *, default: int = 256, window: int = 1024, refresh_every: int = 16) -> None:
        if default < 0 or window <= 0 or refresh_every <= 0:
            raise ValueError("default must be >= 0; window and refresh_every positive")
        self.default = default
        self._window: deque[int] = deque(maxlen=window)
        self._refresh_every = refresh_every
        self._since = 0
        # the window kept sorted as it moves (one bisect each way, not a sort of 1,024 values
        # per refresh); _sorted / _prefix are its snapshot at the last refresh
        self._live: list[int] = []
        self._sorted: list[int] = []
        self._prefix: list[int] = []  # _prefix[i] = sum(_sorted[:i])

    def observe(self, output_tokens: int) -> None:
        if output_tokens < 0:
            raise ValueError("output_tokens must be non-negative")
        window, live = self._window, self._live
        if len(window) == window.maxlen:
            del live[bisect.bisect_left(live, window[0])]
        window.append(output_tokens)
        bisect.insort(live, output_tokens)
        self._since += 1
        if len(window) <= self._refresh_every or self._since >= self._refresh_every:
            self._sorted = live.copy()
            self._prefix = [0, *accumulate(live)]
            self._since = 0

    def expect(self, max_tokens: int | None) -> float:
        """Expected output length of a request allowed `max_tokens` (None: no cap)."""
        values = self._sorted
        if not values:
            return float(self.default if max_tokens is None else min(max_tokens, self.default))
        n = len(values)
        if max_tokens is None:
            return self._prefix[n] / n
        k = bisect.bisect_left(values, max_tokens)  # values[:k] < max_tokens
        return (self._prefix[k] + max_tokens * (n - k)) / n

    @property
    def observations(self) -> int:
        return len(self._window)
