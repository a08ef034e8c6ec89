"""Prefill-decode disaggregation: one request, two servers, chosen together as a pair.

In SGLang's PD mode a request is prefilled on a prefill server, its KV cache is sent over a
link to a decode server, and the decode server streams the answer. The client waits for

    TTFT_p          queue + uncached prefill at prefill server p (its radix cache, its PP)
    + transfer_pd   prompt tokens x KV bytes per token / link bandwidth (min of both ends)
    + wait_d        d's wait for KV room (it preallocates before the prefill may start)
    + step_d        d's decode step that emits the first token (the request joins its batch)

and then reads N tokens at d's step time. The pair (p, d) minimising

    price(p, d) = cost_p + transfer_pd + wait_d + step_d + N x step_d

wins, where cost_p is the `cost` policy's price of p with no decode (TTFT plus the delay p's
prefill imposes on the first tokens pending there) and step_d is d's learned decode step with
this request joined to its batch (`DecodeCostPolicy`): the KV of its decoding requests, of the
requests on their way to it, this prompt and half of the expected output. The KV room of d is
its pool less what its decoding and incoming requests hold, their expected outputs included;
when the request does not fit, the wait for room is the deficit over the rate d frees KV (its
KV in use turns over once per expected output, N steps). The wait comes *before* the
prefill: SGLang's decode server preallocates the request's KV before its prefill server may
start (the prefill server's bootstrap queue holds the request until the decode side's
handshake), so a full decode server delays the whole request. With every link the same speed
the price separates and the pair is the best prefill server with the best decode server;
unequal links make the choice genuinely joint.

**Holding for decode room** (`room_hold`, on with the pair price): when no decode server has
room for a request's prompt plus expected output (by the router's own books: every request
it sent there and has not seen finish, at prompt + E[min(N, max_tokens)]), the request waits
in the router, in one queue for the whole decode pool,
instead of in one decode server's first-come-first-served preallocation queue. As decode
requests finish, held requests are handed out highest response ratio first: the longest
wait per token of room needed (HRRN with the room as the job's size). While the decode pool
is full its room is the scarce resource, and a queue in arrival order lets one large request
hold back every small one behind it; shortest-first alone would starve the large ones, whose
ratio here grows with their wait until they lead. The leader that fits nowhere yet blocks the
rest (room collects for it, as in SGLang's own queue), and it binds, when it fits, to the pair
priced then: its prefill server is chosen when its prefill can start. No knob: the order
does not depend on units.

**A TPOT SLO** (`tpot_slo_s`, off by default): a request also waits while its predicted step
on every decode server (`step_with`: the step the pair price uses) passes the SLO, unless a
server has nothing in flight. A full decode pool otherwise runs at whatever step its KV sets;
admitting less moves the wait into TTFT, which only a deployment with a TPOT target wants.

`PDRouter` holds two `RoutingCore`s, one per pool, and feeds each the events of its side: the
prefill core sees routed / first token (= the prefill server's answer, its prefill done) /
finished; the decode core sees routed / first token (the client's first token) / finished.
With `pair=None` it routes each side with its own core's policy, independently (the way
gateways such as SMG do: e.g. cache_aware for prefill, power_of_two for decode), so the
simulator and the proxy compare both with the same code.

No I/O and no clock: `now` is an argument, as everywhere in `router/core`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.core.cost import OutputLengthModel, PerfModel
from router.core.cost_policy import DEFAULT_PRIOR, CostPolicy
from router.core.model import (
    BackendSpec,
    BackendState,
    BasePolicy,
    Choice,
    RequestRecord,
    RouteRequest,
)
from router.core.policies import build_config, register_policy
from router.core.routing import Decision, NoBackendError, RoutingCore

__all__ = [
    "DecodeCostConfig",
    "DecodeCostPolicy",
    "DecodeQuote",
    "PDDecision",
    "PDRouter",
    "PairConfig",
    "PairQuote",
    "PrefillQuote",
    "best_pair",
    "room_need",
    "transfer_time_s",
]

# Llama-3.1-8B in BF16: 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes.
_LLAMA8B_KV_BYTES = 131_072
# One 400 Gb/s RDMA NIC per GPU (InfiniBand NDR / ConnectX-7) at ~80% of line rate.
_DEFAULT_LINK_BYTES_PER_S = 40e9


@dataclass(frozen=True, slots=True, kw_only=True)
class PairConfig:
    """What the pair price needs beyond the two pools' own models."""

    kv_bytes_per_token: int = _LLAMA8B_KV_BYTES
    # Each server's link for KV transfer, unless `PDRouter(links=...)` names its own.
    link_bytes_per_s: float = _DEFAULT_LINK_BYTES_PER_S

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0:
            raise ValueError("kv_bytes_per_token must be positive")
        if not self.link_bytes_per_s > 0:
            raise ValueError("link_bytes_per_s must be positive")


def transfer_time_s(prompt_tokens: int, kv_bytes_per_token: int, link_bytes_per_s: float) -> float:
    """Seconds to move a prompt's KV cache over a link (SGLang sends the whole prompt's KV)."""
    if prompt_tokens <= 0:
        return 0.0
    return prompt_tokens * kv_bytes_per_token / link_bytes_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillQuote:
    """One prefill server's offer: its predicted TTFT and its price (TTFT + externality)."""

    backend: str
    ttft_s: float
    cost_s: float
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeQuote:
    """One decode server's offer for a request of N expected output tokens.

    `step_s`: its decode step with the request joined (TG); `room_wait_s`: until the request's
    KV fits, counted from now (inf: it can never fit); `cost_s` = (1 + N) x step_s.
    """

    backend: str
    step_s: float
    room_wait_s: float
    cost_s: float

    def __post_init__(self) -> None:
        if self.step_s < 0 or self.room_wait_s < 0 or self.cost_s < 0:
            raise ValueError(f"negative term in {self!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PairQuote:
    """The price of one (prefill, decode) pair; see the module docstring for the terms."""

    prefill: PrefillQuote
    decode: DecodeQuote
    transfer_s: float
    wait_s: float

    @property
    def total_s(self) -> float:
        return self.prefill.cost_s + self.transfer_s + self.wait_s + self.decode.cost_s

    @property
    def ttft_s(self) -> float:
        """The client's predicted first token: prefill, transfer, room wait, one decode step."""
        return self.prefill.ttft_s + self.transfer_s + self.wait_s + self.decode.step_s


def best_pair(
    prefills: Sequence[PrefillQuote],
    decodes: Sequence[DecodeQuote],
    transfer_s: Callable[[str, str], float],
) -> PairQuote | None:
    """The cheapest pair of all P x D (None if either side is empty); ties: first offered.

    Pairs whose decode side can never fit are taken only when no other pair exists.
    """
    best: PairQuote | None = None
    best_key = (True, math.inf)
    for p in prefills:
        for d in decodes:
            move = transfer_s(p.backend, d.backend)
            never = math.isinf(d.room_wait_s)
            wait = 0.0 if never else d.room_wait_s
            quote = PairQuote(prefill=p, decode=d, transfer_s=move, wait_s=wait)
            key = (never, quote.total_s)
            if best is None or key < best_key:
                best, best_key = quote, key
    return best


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeCostConfig:
    """Knobs of the decode side's price."""

    output_default: int = 256  # expected output before any request has finished

    def __post_init__(self) -> None:
        if self.output_default < 0:
            raise ValueError("output_default must be non-negative")


@register_policy
class DecodeCostPolicy(BasePolicy):
    """Decode servers by (1 + N) x TG at their batch, and their KV room (module docstring).

    TG is each server's own `PerfModel` decode line, from its prior, calibrated on every
    finished request: its mean inter-token gap against the batch's KV when it was routed.
    A decode server does no prefill, so the gap is the step itself (no mixed steps to net out).
    """

    name: ClassVar[str] = "pd_decode"
    needs_blocks: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        self.config = build_config(DecodeCostConfig, options, self.name)
        self.outputs = OutputLengthModel(default=self.config.output_default)
        self._models: dict[str, PerfModel] = {}
        self._kv_at: dict[str, dict[str, int]] = {}  # rid -> backend -> batch KV priced
        self._routed_kv: dict[str, int] = {}  # rid -> batch KV at the chosen backend

    def on_backend_added(self, spec: BackendSpec) -> None:
        if spec.id not in self._models:
            self._models[spec.id] = PerfModel(spec.prior or DEFAULT_PRIOR)

    def on_backend_removed(self, backend_id: str) -> None:
        self._models.pop(backend_id, None)

    def _model(self, state: BackendState) -> PerfModel:
        model = self._models.get(state.id)
        if model is None:
            self.on_backend_added(state.spec)
            model = self._models[state.id]
        return model

    def quote(
        self, req: RouteRequest, backends: Sequence[BackendState], now: float
    ) -> list[DecodeQuote]:
        """Every decode server's offer for `req` (remembered until the request is routed)."""
        n = req.prompt_tokens
        out = self.outputs.expect(req.max_tokens)
        kv_at: dict[str, int] = {}
        quotes: list[DecodeQuote] = []
        for state in backends:
            batch_kv = self.batch_kv(state, n, out)
            step = self._model(state).decode_step_time(batch_kv)
            kv_at[state.id] = batch_kv
            quotes.append(
                DecodeQuote(
                    backend=state.id,
                    step_s=step,
                    room_wait_s=_room_wait_s(state, n, out, step),
                    cost_s=(1.0 + out) * step,
                )
            )
        self._kv_at[req.rid] = kv_at
        return quotes

    def batch_kv(self, state: BackendState, prompt_tokens: int, expected_output: float) -> int:
        """The batch KV a request is priced at on `state`: its decoding requests, those on
        their way to it, this prompt and half of the expected output."""
        incoming = state.pending_prefill_tokens  # routed here, KV not arrived / not joined
        return state.decoding_kv_tokens + incoming + prompt_tokens + int(expected_output / 2)

    def step_with(self, state: BackendState, prompt_tokens: int, expected_output: float) -> float:
        """`state`'s learned decode step with a request of this size joined (TG)."""
        return self._model(state).decode_step_time(
            self.batch_kv(state, prompt_tokens, expected_output)
        )

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        """On its own (no pair): the cheapest decode server, room wait included."""
        quotes = self.quote(req, backends, now)
        pick = min(quotes, key=lambda q: q.room_wait_s + q.cost_s)
        return Choice(
            backend=pick.backend, reason="pd_decode", cost_s=pick.room_wait_s + pick.cost_s
        )

    def on_routed(self, rec: RequestRecord, now: float) -> None:
        priced = self._kv_at.pop(rec.request.rid, None)
        kv = None if priced is None else priced.get(rec.backend)
        if kv is not None:
            self._routed_kv[rec.request.rid] = kv

    def on_finished(self, rec: RequestRecord, now: float, output_tokens: int) -> None:
        self.outputs.observe(output_tokens)
        kv = self._routed_kv.pop(rec.request.rid, None)
        model = self._models.get(rec.backend)
        if kv is None or model is None or rec.first_token_at is None or output_tokens < 2:
            return
        model.observe_decode(kv, (now - rec.first_token_at) / (output_tokens - 1))

    def on_failed(self, rec: RequestRecord, now: float) -> None:
        self._routed_kv.pop(rec.request.rid, None)
        self._kv_at.pop(rec.request.rid, None)

    def learned(self) -> dict[str, dict[str, float]]:
        """Each decode server's learned step, for /stats."""
        return {
            b: {
                "decode_step_s": m.learned().decode_step_s,
                "decode_s_per_kv_token": m.learned().decode_s_per_kv_token,
            }
            for b, m in self._models.items()
        }


def _room_wait_s(state: BackendState, n: int, out: float, step_s: float) -> float:
    """Seconds until `n + out` KV tokens fit on `state` (0 now; inf never).

    In use: the decoding requests' KV, the incoming prompts, and every in-flight request's
    expected output (SGLang's decode server reserves room before the transfer). KV frees at
    about `used / (out x step)` tokens per second: the batch turns over once per output.
    """
    capacity = state.spec.kv_capacity_tokens
    if capacity is None:
        return 0.0
    need = n + out
    if need > capacity:
        return math.inf
    used = state.decoding_kv_tokens + state.pending_prefill_tokens + len(state.in_flight) * out
    deficit = used + need - capacity
    if deficit <= 0:
        return 0.0
    return deficit * max(out, 1.0) * step_s / max(used, 1.0)


@dataclass(slots=True, kw_only=True)
class _Held:
    req: RouteRequest
    since: float
    need: int
    exclude_prefill: frozenset[str]
    exclude_decode: frozenset[str]


def room_need(req: RouteRequest, expected_output: float) -> int:
    """Decode KV tokens `req` is expected to take: its prompt and its expected output
    (E[min(N, max_tokens)] over recent outputs), not its cap. SGLang's decode server
    preallocates the prompt and keeps a fixed reserve per request for growth, so books at
    prompt + max_tokens would leave a real pool part empty whenever clients send large caps;
    our simulated decode server reserves the whole output, and a request the books let
    through too early waits in its queue (docs/pd.md)."""
    return req.prompt_tokens + max(math.ceil(expected_output), 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class PDDecision:
    """Where one request goes on each side, and the pair's price when it was priced."""

    prefill: Decision
    decode: Decision
    quote: PairQuote | None = None


class PDRouter:
    """Two pools, one decision per request; see the module docstring."""

    def __init__(
        self,
        prefill: RoutingCore,
        decode: RoutingCore,
        *,
        pair: PairConfig | None = None,
        links: Mapping[str, float] | None = None,
        hold_prefill: bool = False,
        room_hold: bool = False,
        tpot_slo_s: float | None = None,
    ) -> None:
        """`pair` None: each side routes by its own policy. `links`: bytes/s per server id.

        `hold_prefill`: a request counts in its prefill server's load until it finishes, not
        until its prefill does, as SMG counts it (its load guards ride the response body);
        the independent baselines use it to play SMG. `room_hold`: `submit` may hold a
        request until a decode server has room for it (`release` hands it out). `tpot_slo_s`
        (with `room_hold`): it also waits while its predicted step on every decode server
        (the learned TG at the batch it would join) passes the SLO.
        """
        if pair is not None:
            if not isinstance(prefill.policy, CostPolicy):
                raise TypeError("pair pricing needs the `cost` policy on the prefill pool")
            if not isinstance(decode.policy, DecodeCostPolicy):
                raise TypeError("pair pricing needs the `pd_decode` policy on the decode pool")
        if tpot_slo_s is not None and (pair is None or not room_hold):
            raise ValueError("a TPOT SLO needs the pair price and the room hold")
        if tpot_slo_s is not None and not tpot_slo_s > 0:
            raise ValueError("tpot_slo_s must be positive")
        self.prefill = prefill
        self.decode = decode
        self.pair = pair
        self.links = dict(links or {})
        self.hold_prefill = hold_prefill
        self._prefill_open: set[str] = set()
        self._prefill_held: set[str] = set()  # prefill done, still counted (hold_prefill)
        self.room_hold = room_hold
        self.tpot_slo_s = tpot_slo_s
        self._held: dict[str, _Held] = {}  # waiting for decode room, in arrival order
        self._room_of: dict[str, tuple[str, int]] = {}  # rid -> (decode server, its need)
        self._committed: dict[str, int] = {}  # decode server -> KV its in-flight requests hold
        # room freed, a server back, or a request held since the last release
        self._room_changed = False

    def _link(self, backend: str) -> float:
        default = self.pair.link_bytes_per_s if self.pair else _DEFAULT_LINK_BYTES_PER_S
        return self.links.get(backend, default)

    def transfer_s(self, req: RouteRequest, prefill: str, decode: str) -> float:
        per_token = self.pair.kv_bytes_per_token if self.pair else _LLAMA8B_KV_BYTES
        bandwidth = min(self._link(prefill), self._link(decode))
        return transfer_time_s(req.prompt_tokens, per_token, bandwidth)

    # -- holding for decode room ---------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests waiting in the router for decode room."""
        return len(self._held)

    def _need(self, req: RouteRequest) -> int:
        policy = self.decode.policy
        expected = (
            policy.outputs.expect(req.max_tokens)
            if isinstance(policy, DecodeCostPolicy)
            else float(req.max_tokens or 0)
        )
        return room_need(req, expected)

    def _without_room(
        self, req: RouteRequest, need: int, exclude: Collection[str]
    ) -> set[str] | None:
        """Routable decode servers that cannot take `req` (`need` KV tokens) now; None if none
        can (hold). With a TPOT SLO, a server also cannot take it while its predicted step
        with `req` joined would pass the SLO, unless nothing is in flight there (a request
        the SLO cannot fit anywhere goes to an empty server rather than wait for ever)."""
        states = _routable(self.decode, exclude)
        full = set()
        for state in states:
            capacity = state.spec.kv_capacity_tokens
            if capacity is not None and need > capacity:
                continue  # never fits: not the router's to hold
            if capacity is not None and self._committed.get(state.id, 0) + need > capacity:
                full.add(state.id)
            elif self.tpot_slo_s is not None and state.in_flight:
                policy = self.decode.policy
                assert isinstance(policy, DecodeCostPolicy)
                expected = policy.outputs.expect(req.max_tokens)
                if policy.step_with(state, req.prompt_tokens, expected) > self.tpot_slo_s:
                    full.add(state.id)
        return full if len(full) < len(states) else None

    def submit(
        self,
        req: RouteRequest,
        now: float,
        *,
        exclude_prefill: Collection[str] = (),
        exclude_decode: Collection[str] = (),
    ) -> PDDecision | None:
        """`route` now, or None: held until `release` hands it out (with `room_hold`).

        Held when no decode server has room for it, or when others are held already (they go
        first). NoBackendError as `route`.
        """
        if not self.room_hold:
            return self.route(
                req, now, exclude_prefill=exclude_prefill, exclude_decode=exclude_decode
            )
        if not _routable(self.decode, exclude_decode):
            raise NoBackendError(f"no routable decode server for {req.rid!r}")
        need = self._need(req)
        full = None if self._held else self._without_room(req, need, exclude_decode)
        if full is None:
            self._room_changed = True
            self._held[req.rid] = _Held(
                req=req,
                since=now,
                need=need,
                exclude_prefill=frozenset(exclude_prefill),
                exclude_decode=frozenset(exclude_decode),
            )
            return None
        return self.route(
            req, now, exclude_prefill=exclude_prefill, exclude_decode={*exclude_decode, *full}
        )

    def release(self, now: float) -> list[tuple[RouteRequest, PDDecision]]:
        """Held requests that fit a decode server now, longest wait per token of need first,
        each routed to a pair whose decode server has its room; stops at the first that fits
        nowhere. Call it as decode requests end and when a server becomes routable again; it
        does nothing unless room was freed, a server came back (`backends_changed`) or a
        request was held since the last call.
        """
        if not self._held or not self._room_changed:
            return []
        self._room_changed = False
        out: list[tuple[RouteRequest, PDDecision]] = []
        order = sorted(
            self._held.values(), key=lambda h: (-(now - h.since) / max(h.need, 1), h.since)
        )
        for h in order:
            full = self._without_room(h.req, h.need, h.exclude_decode)
            if full is None:
                break
            try:
                decision = self.route(
                    h.req,
                    now,
                    exclude_prefill=h.exclude_prefill,
                    exclude_decode={*h.exclude_decode, *full},
                )
            except NoBackendError:
                break  # no prefill server to take it now: it stays first in line
            del self._held[h.req.rid]
            out.append((h.req, decision))
        return out

    def backends_changed(self) -> None:
        """A server became routable (recovered, added, undrained): the next `release`
        looks again, since a held request may fit there or its prefill side may be back."""
        if self._held:
            self._room_changed = True

    def cancel(self, rid: str) -> bool:
        """Drop a held request (its client left); False if it is not held."""
        return self._held.pop(rid, None) is not None

    def _commit_room(self, rid: str, decode: str, need: int) -> None:
        self._room_of[rid] = (decode, need)
        self._committed[decode] = self._committed.get(decode, 0) + need

    def free_room(self, rid: str) -> None:
        """`rid` no longer holds decode room (its decode side ended)."""
        entry = self._room_of.pop(rid, None)
        if entry is not None:
            decode, need = entry
            self._committed[decode] -= need
            self._room_changed = True

    def route(
        self,
        req: RouteRequest,
        now: float,
        *,
        exclude_prefill: Collection[str] = (),
        exclude_decode: Collection[str] = (),
    ) -> PDDecision:
        """Choose and record both sides (NoBackendError if a pool has nothing routable)."""
        decision = self._route(
            req, now, exclude_prefill=exclude_prefill, exclude_decode=exclude_decode
        )
        if self.room_hold:  # the books only the hold reads
            self._commit_room(req.rid, decision.decode.backend, self._need(req))
        return decision

    def _route(
        self,
        req: RouteRequest,
        now: float,
        *,
        exclude_prefill: Collection[str],
        exclude_decode: Collection[str],
    ) -> PDDecision:
        # A prefill server decodes nothing, and its answer (the prefill's end) is always seen,
        # streamed or not.
        prefill_req = dataclasses.replace(req, max_tokens=0, first_token_seen=True)
        if self.pair is None:
            p = self.prefill.route(prefill_req, now, exclude=exclude_prefill)
            try:
                d = self.decode.route(req, now, exclude=exclude_decode)
            except NoBackendError:
                self.prefill.on_failed(req.rid, now)
                raise
            self._prefill_open.add(req.rid)
            return PDDecision(prefill=p, decode=d)
        pstates = _routable(self.prefill, exclude_prefill)
        dstates = _routable(self.decode, exclude_decode)
        if not pstates or not dstates:
            side = "prefill" if not pstates else "decode"
            raise NoBackendError(f"no routable {side} server for {req.rid!r}")
        cost = self.prefill.policy
        assert isinstance(cost, CostPolicy)
        dpolicy = self.decode.policy
        assert isinstance(dpolicy, DecodeCostPolicy)
        pquotes = []
        for state in pstates:
            c = cost.choose(prefill_req, [state], now)
            ttft = c.predicted_ttft_s or 0.0
            pquotes.append(
                PrefillQuote(
                    backend=c.backend,
                    ttft_s=ttft,
                    cost_s=ttft if c.cost_s is None else c.cost_s,
                    cached_tokens=c.predicted_cached_tokens,
                )
            )
        dquotes = dpolicy.quote(req, dstates, now)
        quote = best_pair(pquotes, dquotes, lambda p, d: self.transfer_s(req, p, d))
        assert quote is not None
        chosen_p = next(s for s in pstates if s.id == quote.prefill.backend)
        # choose() once more on the winner alone, so the cost policy's books hold its numbers
        pchoice = cost.choose(prefill_req, [chosen_p], now)
        p = self.prefill.route(prefill_req, now, choice=pchoice)
        dchoice = Choice(
            backend=quote.decode.backend,
            predicted_ttft_s=quote.ttft_s,
            reason=f"pair {quote.total_s:.3f}s",
            cost_s=quote.total_s,
        )
        d = self.decode.route(req, now, choice=dchoice)
        self._prefill_open.add(req.rid)
        return PDDecision(prefill=p, decode=d, quote=quote)

    # -- events ---------------------------------------------------------------------------

    def on_prefill_done(self, rid: str, now: float, cached_tokens: int | None = None) -> None:
        """The prefill server answered: its prefill (and first token) is done."""
        if rid not in self._prefill_open:
            return
        self._prefill_open.discard(rid)
        self.prefill.on_first_token(rid, now, cached_tokens)
        if self.hold_prefill:
            self._prefill_held.add(rid)
        else:
            self.prefill.on_finished(rid, now, 1, cached_tokens)

    def on_prefill_failed(self, rid: str, now: float) -> None:
        """The prefill side ended without an answer (its request failed or was cancelled)."""
        if rid in self._prefill_open or rid in self._prefill_held:
            self._prefill_open.discard(rid)
            self._prefill_held.discard(rid)
            self.prefill.on_failed(rid, now)

    def prefill_open(self, rid: str) -> bool:
        return rid in self._prefill_open

    def on_first_token(self, rid: str, now: float) -> None:
        """The decode server streamed the client's first token."""
        self.on_prefill_done(rid, now)  # it cannot come before the prefill finished
        self.decode.on_first_token(rid, now)

    def on_finished(
        self, rid: str, now: float, output_tokens: int, cached_tokens: int | None = None
    ) -> None:
        self.on_prefill_done(rid, now, cached_tokens)
        if rid in self._prefill_held:
            self._prefill_held.discard(rid)
            self.prefill.on_finished(rid, now, 1, cached_tokens)
        self.free_room(rid)
        self.decode.on_finished(rid, now, output_tokens)

    def on_failed(self, rid: str, now: float) -> None:
        self.cancel(rid)
        self.free_room(rid)
        self.on_prefill_failed(rid, now)
        self.decode.on_failed(rid, now)

    def hold_stats(self) -> dict[str, Any]:
        """How the pair is chosen and what waits in the router (the `pd` part of /stats)."""
        return {
            "mode": "pair" if self.pair else "independent",
            "room_hold": self.room_hold,
            "held_for_decode_room": len(self._held),
            "tpot_slo_s": self.tpot_slo_s,
        }

    def stats(self) -> dict[str, Any]:
        return {**self.hold_stats(), "prefill": self.prefill.stats(), "decode": self.decode.stats()}


def _routable(core: RoutingCore, exclude: Collection[str]) -> list[BackendState]:
    return [s for s in core.backends() if s.routable and s.id not in exclude]
