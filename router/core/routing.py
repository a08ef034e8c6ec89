"""RoutingCore: the one object that both the live proxy and the virtual-time simulator drive.

The core owns every backend's `BackendState` and every in-flight `RequestRecord`. Callers feed
it events with explicit times; it keeps the load fields up to date and forwards each event to
the policy, so a policy only decides and never counts::

    route(req, now)          -> policy.choose(routable backends) -> record in flight
                                in_flight += req, pending_prefill_tokens += prompt tokens
    on_first_token(rid, now) -> pending_prefill_tokens -= prompt, decoding += 1,
                                decoding_kv_tokens += prompt + 1 (the first output token)
    on_finished / on_failed  -> undo whatever the request still holds; exactly one of the two

A request ends in exactly one of finished or failed. Later events for an ended rid, and events
for rids the core never saw, are ignored without error: the proxy's streaming and abort paths
may race, and a retry ends the first attempt (`on_failed`) before routing the same rid again.

Each record remembers the `BackendState` it was counted in, so a backend removed (and maybe
re-added under the same id) while requests are in flight never gets another attempt's counts.

No I/O, no clock, no logging: `now` is an argument and everything is plain bookkeeping.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from router.core.model import (
    BackendSpec,
    BackendState,
    Choice,
    Explanation,
    Policy,
    RequestRecord,
    RouteRequest,
)

__all__ = ["Decision", "NoBackendError", "RoutingCore"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Where one request goes, and what the policy expected there (for /stats and feedback)."""

    backend: str
    predicted_cached_tokens: int
    predicted_ttft_s: float | None
    reason: str
    explain: Explanation | None = None


class NoBackendError(LookupError):
    """No routable backend is left for a request (the proxy answers 503)."""


class _Counters:
    """Per-backend totals for `stats()`; mutable, private to the core."""

    __slots__ = (
        "failed",
        "finished",
        "predicted_cached_tokens",
        "predicted_cached_tokens_reported",
        "prompt_tokens_reported",
        "reported",
        "reported_cached_tokens",
        "routed",
    )

    def __init__(self) -> None:
        self.routed = 0
        self.finished = 0
        self.failed = 0
        self.predicted_cached_tokens = 0  # over every routed request
        self.reported = 0  # requests whose backend reported cached_tokens
        self.reported_cached_tokens = 0
        self.predicted_cached_tokens_reported = 0  # predictions of those same requests
        self.prompt_tokens_reported = 0


class RoutingCore:
    """Backends, in-flight requests and one policy; see the module docstring."""

    def __init__(self, policy: Policy, backends: Sequence[BackendSpec] = ()) -> None:
        self.policy: Policy = policy
        self._backends: dict[str, BackendState] = {}
        self._counters: dict[str, _Counters] = {}
        self._records: dict[str, RequestRecord] = {}
        self._where: dict[str, BackendState] = {}  # rid -> the state its load is counted in
        self._kv_added: dict[str, int] = {}  # rid -> decoding_kv_tokens it added
        for spec in backends:
            self.add_backend(spec)

    # -- backends -------------------------------------------------------------------------

    def add_backend(self, spec: BackendSpec) -> None:
        """Add a backend, or replace the spec of a known one keeping its live state."""
        state = self._backends.get(spec.id)
        if state is None:
            self._backends[spec.id] = BackendState(spec=spec)
            self._counters[spec.id] = _Counters()
        else:
            state.spec = spec
        self.policy.on_backend_added(spec)

    def remove_backend(self, backend_id: str) -> None:
        """Forget a backend; its in-flight requests stay recorded until they end."""
        self._state(backend_id)
        del self._backends[backend_id]
        del self._counters[backend_id]
        self.policy.on_backend_removed(backend_id)

    def set_healthy(self, backend_id: str, healthy: bool) -> bool:
        """Mark a backend (un)healthy; True if that changed it."""
        state = self._state(backend_id)
        changed, state.healthy = state.healthy != healthy, healthy
        return changed

    def set_draining(self, backend_id: str, draining: bool) -> None:
        self._state(backend_id).draining = draining

    def set_reported_load(self, backend_id: str, running: int | None, waiting: int | None) -> None:
        """What the backend itself says it runs and queues (a poller's /get_load)."""
        state = self._state(backend_id)
        state.reported_running = running
        state.reported_waiting = waiting

    def backends(self) -> Sequence[BackendState]:
        """Every known backend in the order added (live objects: read, do not write)."""
        return tuple(self._backends.values())

    def _state(self, backend_id: str) -> BackendState:
        state = self._backends.get(backend_id)
        if state is None:
            raise KeyError(f"unknown backend {backend_id!r}")
        return state

    # -- requests -------------------------------------------------------------------------

    def route(
        self,
        req: RouteRequest,
        now: float,
        *,
        exclude: Collection[str] = (),
        choice: Choice | None = None,
    ) -> Decision:
        """Pick a backend for `req` among the routable ones outside `exclude`; record it.

        `choice`: the policy's answer already asked for (the scheduler asks `choose` itself,
        with its own held work counted); it is checked like any other and recorded.
        """
        if req.rid in self._records:
            raise ValueError(f"request id {req.rid!r} is already in flight")
        states = self._backends.values()
        if exclude:
            candidates = [s for s in states if s.routable and s.id not in exclude]
        else:  # the usual case (no retry): one property read per backend, not two
            candidates = [s for s in states if s.routable]
        if not candidates:
            raise NoBackendError(
                f"no routable backend for {req.rid!r} "
                f"({len(self._backends)} known, {len(exclude)} excluded)"
            )
        if choice is None:
            choice = self.policy.choose(req, candidates, now)
        # A dict lookup, not a scan of the candidates (256 backends: ~15 us saved per decision).
        state = self._backends.get(choice.backend)
        if state is None or not state.routable or state.id in exclude:
            raise RuntimeError(
                f"policy {self.policy.name!r} chose {choice.backend!r}, "
                "which is not among the routable backends it was offered"
            )
        rec = RequestRecord(
            request=req,
            backend=state.id,
            routed_at=now,
            predicted_cached_tokens=choice.predicted_cached_tokens,
            predicted_ttft_s=choice.predicted_ttft_s,
        )
        self._records[req.rid] = rec
        self._where[req.rid] = state
        state.in_flight[req.rid] = rec
        state.pending_prefill_tokens += req.prompt_tokens
        counters = self._counters[state.id]
        counters.routed += 1
        counters.predicted_cached_tokens += choice.predicted_cached_tokens
        self.policy.on_routed(rec, now)
        return Decision(
            backend=state.id,
            predicted_cached_tokens=choice.predicted_cached_tokens,
            predicted_ttft_s=choice.predicted_ttft_s,
            reason=choice.reason,
            explain=choice.explain,
        )

    def on_first_token(self, rid: str, now: float, cached_tokens: int | None = None) -> None:
        """The first output token came back: the request moves from prefill to decode."""
        rec = self._records.get(rid)
        if rec is None or rec.first_token_at is not None:
            return
        rec.first_token_at = now
        if cached_tokens is not None:
            rec.cached_tokens = cached_tokens
        state = self._where[rid]
        state.pending_prefill_tokens -= rec.request.prompt_tokens
        kv = rec.request.prompt_tokens + 1
        self._kv_added[rid] = kv
        state.decoding += 1
        state.decoding_kv_tokens += kv
        self.policy.on_first_token(rec, now)

    def on_finished(
        self, rid: str, now: float, output_tokens: int, cached_tokens: int | None = None
    ) -> None:
        """The request completed with a response (ignored if it already ended)."""
        ended = self._end(rid)
        if ended is None:
            return
        rec, counters = ended
        if cached_tokens is not None:
            rec.cached_tokens = cached_tokens
        if counters is not None:
            counters.finished += 1
            if rec.cached_tokens is not None:
                counters.reported += 1
                counters.reported_cached_tokens += rec.cached_tokens
                counters.predicted_cached_tokens_reported += rec.predicted_cached_tokens
                counters.prompt_tokens_reported += rec.request.prompt_tokens
        self.policy.on_finished(rec, now, output_tokens)

    def on_failed(self, rid: str, now: float) -> None:
        """The request ended without a response: error, abort, or retried elsewhere."""
        ended = self._end(rid)
        if ended is None:
            return
        rec, counters = ended
        if counters is not None:
            counters.failed += 1
        self.policy.on_failed(rec, now)

    def _end(self, rid: str) -> tuple[RequestRecord, _Counters | None] | None:
        """Take `rid` out of flight and give back every load it held; None if not in flight.

        Also returns the counters to credit: None when the backend was removed meanwhile.
        """
        rec = self._records.pop(rid, None)
        if rec is None:
            return None
        state = self._where.pop(rid)
        del state.in_flight[rid]
        kv = self._kv_added.pop(rid, None)
        if kv is None:  # never saw a first token: still counted as pending prefill
            state.pending_prefill_tokens -= rec.request.prompt_tokens
        else:
            state.decoding -= 1
            state.decoding_kv_tokens -= kv
        live = self._backends.get(rec.backend) is state
        return rec, (self._counters[rec.backend] if live else None)

    def record(self, rid: str) -> RequestRecord | None:
        """The in-flight record of `rid`, or None once it ended (or was never routed)."""
        return self._records.get(rid)

    # -- reporting ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot: per-backend load, counts, predicted vs reported cached tokens."""
        backends: dict[str, Any] = {}
        for state in self._backends.values():
            c = self._counters[state.id]
            backends[state.id] = {
                "healthy": state.healthy,
                "draining": state.draining,
                "load": state.load,
                "pending_prefill_tokens": state.pending_prefill_tokens,
                "decoding": state.decoding,
                "decoding_kv_tokens": state.decoding_kv_tokens,
                "reported_running": state.reported_running,
                "reported_waiting": state.reported_waiting,
                "routed": c.routed,
                "finished": c.finished,
                "failed": c.failed,
                "predicted_cached_tokens": c.predicted_cached_tokens,
                "reported_requests": c.reported,
                "reported_cached_tokens": c.reported_cached_tokens,
                "predicted_cached_tokens_reported": c.predicted_cached_tokens_reported,
                "prompt_tokens_reported": c.prompt_tokens_reported,
            }
        out: dict[str, Any] = {
            "policy": self.policy.name,
            "in_flight": len(self._records),
            "backends": backends,
        }
        policy_stats = getattr(self.policy, "stats", None)
        if callable(policy_stats):
            out["policy_stats"] = policy_stats()
        return out
