"""The data that crosses the routing core's boundary, and the one Policy protocol.

Everything here is a frozen, slotted, keyword-only dataclass validated when built, so an
invalid request or backend description cannot exist. The live proxy and the virtual-time
simulator build the same `RouteRequest`s and feed `RoutingCore` (see `routing.py`) the same
events (routed, first token, finished, failed), so a policy cannot tell which one runs it.

Token ranges of a request, as the router sees them::

    prompt_tokens = n
    |<------------------------------- n ------------------------------->|
    |  block 0  |  block 1  |  block 2  |  ...  | block k-1 (maybe part) |
    |<-- cached at backend b (whole blocks) -->|<---- prefill at PP_b ---->|
                                               then N output tokens at TG_b

`blocks[i]` is a 64-bit hash chained on `blocks[i-1]`, so two requests with the same hash at
depth i share the whole prefix up to and including block i.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

__all__ = [
    "BackendSpec",
    "BackendState",
    "BasePolicy",
    "Choice",
    "Explanation",
    "PerfPrior",
    "Policy",
    "RequestRecord",
    "RouteRequest",
    "attention_pairs",
]


def attention_pairs(new_tokens: int, context_tokens: int) -> int:
    """Causal attention pairs of `new_tokens` appended at the end of a `context_tokens` prompt.

    Each new token attends to the cached prefix and to the new tokens before it::

        new * (ctx - new)  +  new * (new + 1) / 2

    so a fresh prompt costs about n^2 / 2 and a short suffix on a long prefix about new * ctx.
    """
    new = max(new_tokens, 0)
    ctx = max(context_tokens, new)
    return new * (ctx - new) + new * (new + 1) // 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PerfPrior:
    """What we believe about a backend's two speeds before we have measured it.

    prefill time(new, ctx) = new / prefill_tokens_per_s + pairs(new, ctx) * prefill_s_per_token_ctx
    decode step time       = decode_step_s + decode_s_per_kv_token * (KV tokens in the batch)

    pairs(new, ctx) counts the (query, key) pairs causal attention computes when `new` tokens
    are appended to a prompt whose context ends at `ctx` (see `attention_pairs`).
    """

    prefill_tokens_per_s: float
    prefill_s_per_token_ctx: float = 0.0
    decode_step_s: float
    decode_s_per_kv_token: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be positive")
        if self.decode_step_s <= 0:
            raise ValueError("decode_step_s must be positive")
        if self.prefill_s_per_token_ctx < 0 or self.decode_s_per_kv_token < 0:
            raise ValueError("per-token coefficients must be non-negative")

    def prefill_time(self, new_tokens: int, context_tokens: int) -> float:
        return (
            new_tokens / self.prefill_tokens_per_s
            + attention_pairs(new_tokens, context_tokens) * self.prefill_s_per_token_ctx
        )

    def decode_step_time(self, batch_kv_tokens: int) -> float:
        return self.decode_step_s + self.decode_s_per_kv_token * batch_kv_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSpec:
    """A backend as the router knows it: identity, what it said about itself, our prior."""

    id: str
    kv_capacity_tokens: int | None = None  # from /get_server_info max_total_num_tokens
    # A hierarchical cache's host pool (SGLang HiCache): prefixes there load back, not recompute.
    host_cache_tokens: int = 0
    page_size: int = 1
    prior: PerfPrior | None = None
    max_running_requests: int | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("backend id must be non-empty")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens <= 0:
            raise ValueError("kv_capacity_tokens must be positive")
        if self.page_size <= 0:
            raise ValueError("page_size must be positive")
        if self.host_cache_tokens < 0:
            raise ValueError("host_cache_tokens must be non-negative")

    @property
    def cache_capacity_tokens(self) -> int | None:
        """Prefix-cache tokens the backend can keep: device pool plus any host tier."""
        if self.kv_capacity_tokens is None:
            return None
        return self.kv_capacity_tokens + self.host_cache_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRequest:
    """One request as the routing core sees it: no text, only chained block hashes and sizes."""

    rid: str
    blocks: tuple[int, ...]
    block_tokens: int
    prompt_tokens: int
    max_tokens: int | None = None
    session_key: str | None = None
    # False when the response will not show its first token (a non-streaming request): the
    # core hears of it only at the end, so a policy must not wait for its first token.
    first_token_seen: bool = True

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        if self.prompt_tokens < 0:
            raise ValueError("prompt_tokens must be non-negative")
        if len(self.blocks) > 0 and self.prompt_tokens > len(self.blocks) * self.block_tokens:
            raise ValueError("prompt_tokens exceeds what the blocks can hold")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be non-negative")

    def tokens_in_blocks(self, count: int) -> int:
        """Prompt tokens covered by the first `count` blocks (the last block may be partial)."""
        return min(count * self.block_tokens, self.prompt_tokens)


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """The core's record of one routed request, from routing to its one ending."""

    request: RouteRequest
    backend: str
    routed_at: float
    predicted_cached_tokens: int = 0
    predicted_ttft_s: float | None = None
    first_token_at: float | None = None
    cached_tokens: int | None = None  # what the backend reported


@dataclass(slots=True, kw_only=True)
class BackendState:
    """A backend's live state in the core: the spec plus what the core tracks about it.

    Policies read it; only `RoutingCore` writes it.
    """

    spec: BackendSpec
    healthy: bool = True
    draining: bool = False
    in_flight: dict[str, RequestRecord] = field(default_factory=dict)
    # prompt tokens routed here whose first token has not come back yet (queued or prefilling)
    pending_prefill_tokens: int = 0
    # routed here, first token seen, not finished: the decode batch as the router sees it
    decoding: int = 0
    # KV tokens of the decoding requests (prompt + output so far, estimated)
    decoding_kv_tokens: int = 0
    # backend-reported load, when a poller supplies it (None in simulation)
    reported_running: int | None = None
    reported_waiting: int | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def load(self) -> int:
        """The router's own in-flight count, as sglang-router counts load."""
        return len(self.in_flight)

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    """Why a cost-model policy chose its backend: the chosen one's predicted TTFT by term,
    and the runner-up (the backend of next-lowest cost) with its predicted TTFT.

    queue_s + prefill_s + decode_s is the chosen backend's predicted TTFT; decode_s is the
    decode step that shares the prefill's step (0 when the backend was idle). The runner-up
    is None when only one backend was offered.
    """

    queue_s: float
    prefill_s: float
    decode_s: float
    cached_tokens: int
    runner_up: str | None = None
    runner_up_ttft_s: float | None = None

    def __post_init__(self) -> None:
        if min(self.queue_s, self.prefill_s, self.decode_s) < 0 or self.cached_tokens < 0:
            raise ValueError(f"negative term in {self!r}")
        if (self.runner_up is None) != (self.runner_up_ttft_s is None):
            raise ValueError("runner_up and runner_up_ttft_s come together")

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.prefill_s + self.decode_s


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    """A policy's answer: where to go and what it expects there (for /stats and feedback).

    `explain` is set by policies with a cost model (`cost`, `oracle`) for `serve --explain`.
    """

    backend: str
    predicted_cached_tokens: int = 0
    predicted_ttft_s: float | None = None
    reason: str = ""
    explain: Explanation | None = None
    # The policy's own price of this choice (cost: TTFT + N x TG + externalities), in seconds;
    # what the PD pair router (router/core/pd.py) adds to the decode side's price.
    cost_s: float | None = None


@runtime_checkable
class Policy(Protocol):
    """One routing policy. `choose` gets only routable backends (never empty)."""

    name: ClassVar[str]
    needs_blocks: ClassVar[bool]  # False: the proxy may skip tokenizing the prompt

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice: ...

    def on_routed(self, rec: RequestRecord, now: float) -> None: ...

    def on_first_token(self, rec: RequestRecord, now: float) -> None: ...

    def on_finished(self, rec: RequestRecord, now: float, output_tokens: int) -> None: ...

    def on_failed(self, rec: RequestRecord, now: float) -> None: ...

    def on_backend_added(self, spec: BackendSpec) -> None: ...

    def on_backend_removed(self, backend_id: str) -> None: ...

    def on_remote_routed(self, backend: str, req: RouteRequest, now: float) -> None: ...

    def on_remote_first_token(self, backend: str, rid: str, now: float) -> None: ...

    def on_remote_ended(self, backend: str, rid: str, now: float) -> None: ...


class BasePolicy:
    """No-op hooks, so a policy overrides only what it uses (sglang-router's habit)."""

    name: ClassVar[str] = "base"
    needs_blocks: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random(0)

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        raise NotImplementedError

    def on_routed(self, rec: RequestRecord, now: float) -> None:
        return None

    def on_first_token(self, rec: RequestRecord, now: float) -> None:
        return None

    def on_finished(self, rec: RequestRecord, now: float, output_tokens: int) -> None:
        return None

    def on_failed(self, rec: RequestRecord, now: float) -> None:
        return None

    def on_backend_added(self, spec: BackendSpec) -> None:
        return None

    def on_backend_removed(self, backend_id: str) -> None:
        return None

    # Another router replica's traffic (router.state): what it routed where, and when that
    # request's prefill finished and it ended, so shared beliefs and queues stay in step.
    # `rid` is unique across replicas (the state layer prefixes the replica's id).
    def on_remote_routed(self, backend: str, req: RouteRequest, now: float) -> None:
        return None

    def on_remote_first_token(self, backend: str, rid: str, now: float) -> None:
        return None

    def on_remote_ended(self, backend: str, rid: str, now: float) -> None:
        return None
