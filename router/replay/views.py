"""Several routing views in virtual time: the worker processes of `serve --workers N`.

Each worker of a live router has its own `RoutingCore` and hears what the others routed a
moment later (router/state: Routed, FirstToken, Ended through the hub, batched over ~2 ms).
`ViewSync` plays that in the simulator: arrivals are dealt to the views in turn (the kernel
spreads connections; a conversation's turns need not land on one worker), each view routes
with its own beliefs, and every routed / first-token / ended moment of one view reaches the
others' policies through their remote hooks `delay_s` later, under the rid `v<k>/<rid>`, as
`StateSync.apply` does live. `delay_s = inf` is N routers that share nothing.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.core.model import RouteRequest
from router.core.routing import RoutingCore

__all__ = ["ViewSync"]

_ROUTED, _FIRST, _ENDED = 0, 1, 2


@dataclass(order=True, slots=True)
class _Remote:
    t: float
    seq: int
    view: int = field(compare=False)  # the view that hears it
    kind: int = field(compare=False)
    backend: str = field(compare=False)
    rid: str = field(compare=False)
    req: RouteRequest | None = field(compare=False, default=None)


class ViewSync:
    """N cores, each hearing the others' routing events `delay_s` later (module docstring)."""

    def __init__(self, cores: Sequence[RoutingCore], delay_s: float) -> None:
        if not cores:
            raise ValueError("at least one view")
        if not delay_s >= 0:
            raise ValueError("delay_s must be >= 0")
        self.cores = list(cores)
        self.delay_s = delay_s
        self._heap: list[_Remote] = []
        self._seq = 0
        self.owner: dict[str, int] = {}
        self.applied = 0

    def view_for(self, position: int) -> int:
        """The view that gets the trace's `position`-th arrival (dealt in turn)."""
        return position % len(self.cores)

    def core_of(self, rid: str) -> RoutingCore:
        return self.cores[self.owner.get(rid, 0)]

    def _share(self, view: int, kind: int, backend: str, rid: str, now: float,
               req: RouteRequest | None = None) -> None:  # fmt: skip
        if math.isinf(self.delay_s):
            return
        for other in range(len(self.cores)):
            if other != view:
                self._seq += 1
                heapq.heappush(
                    self._heap,
                    _Remote(now + self.delay_s, self._seq, other, kind, backend, f"v{view}/{rid}",
                            req),
                )  # fmt: skip

    def routed(self, view: int, backend: str, req: RouteRequest, now: float) -> None:
        self.owner[req.rid] = view
        remote = RouteRequest(
            rid=f"v{view}/{req.rid}", blocks=req.blocks, block_tokens=req.block_tokens,
            prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens,
        )  # fmt: skip
        self._share(view, _ROUTED, backend, req.rid, now, remote)

    def first_token(self, rid: str, backend: str, now: float) -> None:
        self._share(self.owner.get(rid, 0), _FIRST, backend, rid, now)

    def ended(self, rid: str, backend: str, now: float) -> None:
        self._share(self.owner.pop(rid, 0), _ENDED, backend, rid, now)

    def apply_until(self, now: float) -> None:
        """Hand every remote event due by `now` to its view's policy, in time order."""
        while self._heap and self._heap[0].t <= now:
            e = heapq.heappop(self._heap)
            policy = self.cores[e.view].policy
            if e.kind == _ROUTED:
                assert e.req is not None
                policy.on_remote_routed(e.backend, e.req, e.t)
            elif e.kind == _FIRST:
                policy.on_remote_first_token(e.backend, e.rid, e.t)
            else:
                policy.on_remote_ended(e.backend, e.rid, e.t)
            self.applied += 1
