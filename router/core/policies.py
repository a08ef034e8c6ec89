"""The baseline routing policies and the registry every policy is found through.

Every policy is a class with a `name`, built as `cls(rng=..., **options)`: the options fill the
policy's one frozen config dataclass (where it has knobs), and all randomness comes from the
injected `random.Random`, so a seeded run routes the same way every time. `make_policy(name)`
is how the proxy and the simulator build one; `register_policy` is how a module adds one.

Baselines (each sees only routable backends, never an empty list; load = the router's own
in-flight count, `BackendState.load`, as sglang-router counts it):

- `round_robin`: the i-th request goes to routable backend i mod n (sglang-router's counter).
- `random`: uniform over the routable backends.
- `least_load`: fewest in-flight requests; ties by the rng (default) or by backend order.
- `power_of_two`: two distinct backends at random, the less loaded one (ties: the first drawn).
- `session`: consistent hashing of `RouteRequest.session_key` onto a ring of virtual nodes per
  backend. A key whose backend is not routable walks clockwise to the next routable one, and a
  removed backend takes only its own points off the ring, so only its keys move. Without a key
  the chained hash of the first `prefix_blocks` blocks (default 2) is the key, so requests
  sharing that prefix stick to one backend; with no blocks either, round robin.

`cache_aware` (sglang-router 0.3.2) lives in `cache_aware.py`, `cost` and `oracle` in
`cost_policy.py`; importing this module registers them too (see `_load_builtin_policies`).
A module that fails to import is remembered, and `make_policy` names the failure if asked for
one of its policies, instead of hiding it behind "unknown policy".
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar

from router.core.model import BackendSpec, BackendState, BasePolicy, Choice, Policy, RouteRequest

__all__ = [
    "POLICIES",
    "LeastLoadConfig",
    "LeastLoadPolicy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SessionConfig",
    "SessionPolicy",
    "build_config",
    "make_policy",
    "register_policy",
]

POLICIES: dict[str, type[BasePolicy]] = {}

# Modules holding policies that are not baselines; imported when this module is.
_BUILTIN_MODULES = ("router.core.cache_aware", "router.core.cost_policy", "router.core.pd")
_IMPORT_ERRORS: dict[str, str] = {}

P = TypeVar("P", bound=type[BasePolicy])
C = TypeVar("C")


def register_policy(cls: P) -> P:
    """Class decorator: make `cls` buildable by `make_policy(cls.name)`."""
    name = cls.name
    if not name or name == BasePolicy.name:
        raise ValueError(f"{cls.__qualname__} needs its own `name` to be registered")
    existing = POLICIES.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(
            f"policy name {name!r} is taken by {existing.__module__}.{existing.__qualname__}"
        )
    POLICIES[name] = cls
    return cls


def make_policy(name: str, *, rng: random.Random | None = None, **options: Any) -> Policy:
    """Build the policy registered as `name`; ValueError naming the known ones if none is."""
    cls = POLICIES.get(name)
    if cls is None:
        known = ", ".join(sorted(POLICIES))
        message = f"unknown policy {name!r}; known: {known}"
        if _IMPORT_ERRORS:
            failed = "; ".join(f"{mod}: {err}" for mod, err in sorted(_IMPORT_ERRORS.items()))
            message += f" (could not import {failed})"
        raise ValueError(message)
    policy: Policy = cls(rng=rng, **options)
    return policy


def build_config(config_class: type[C], options: dict[str, Any], policy: str) -> C:
    """Fill a policy's config dataclass from keyword options; ValueError for unknown ones."""
    known = {f.name for f in fields(config_class)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for policy {policy!r}; "
            f"known: {', '.join(sorted(known)) or '(none)'}"
        )
    return config_class(**options)


def _no_options(options: dict[str, Any], policy: str) -> None:
    if options:
        raise ValueError(f"policy {policy!r} takes no options (got {', '.join(sorted(options))})")


def _h64(text: str) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@register_policy
class RoundRobinPolicy(BasePolicy):
    """Each routable backend in turn: the baseline that ignores both cache and load."""

    name: ClassVar[str] = "round_robin"
    needs_blocks: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        _no_options(options, self.name)
        self._counter = 0

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        index = self._counter % len(backends)
        self._counter += 1
        return Choice(backend=backends[index].id, reason="round_robin")


@register_policy
class RandomPolicy(BasePolicy):
    """Uniform over the routable backends, from the injected rng."""

    name: ClassVar[str] = "random"
    needs_blocks: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        _no_options(options, self.name)

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        return Choice(backend=backends[self.rng.randrange(len(backends))].id, reason="random")


@dataclass(frozen=True, slots=True, kw_only=True)
class LeastLoadConfig:
    """`tie_break`: among equally loaded backends, "random" (rng) or "first" (backend order)."""

    tie_break: Literal["random", "first"] = "random"

    def __post_init__(self) -> None:
        if self.tie_break not in ("random", "first"):
            raise ValueError("tie_break must be 'random' or 'first'")


@register_policy
class LeastLoadPolicy(BasePolicy):
    """Fewest in-flight requests: balances load, ignores the cache."""

    name: ClassVar[str] = "least_load"
    needs_blocks: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        self.config = build_config(LeastLoadConfig, options, self.name)

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        low = min(b.load for b in backends)
        tied = [b for b in backends if b.load == low]
        pick = tied[0] if self.config.tie_break == "first" else tied[self.rng.randrange(len(tied))]
        return Choice(backend=pick.id, reason="least_load")


@register_policy
class PowerOfTwoPolicy(BasePolicy):
    """Two distinct random backends, the less loaded one (sglang-router's power_of_two)."""

    name: ClassVar[str] = "power_of_two"
    needs_blocks: ClassVar[bool] = False

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        _no_options(options, self.name)

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        if len(backends) == 1:
            return Choice(backend=backends[0].id, reason="power_of_two")
        i, j = self.rng.sample(range(len(backends)), 2)
        first, second = backends[i], backends[j]
        pick = first if first.load <= second.load else second
        return Choice(backend=pick.id, reason="power_of_two")


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Ring shape and the fallback key.

    `virtual_nodes`: points per backend on the ring; more points spread keys more evenly
    (the standard deviation of a backend's share falls as 1/sqrt(points)).
    `prefix_blocks`: without a session key, the key is the chained hash of this many leading
    blocks (fewer when the prompt is shorter), so requests sharing that prefix stick together.
    One block is too few when a system prompt opens every request: all 12,031 requests of the
    Mooncake conversation trace share block 0, so prefix_blocks=1 sends them all to one backend
    (mean TTFT about an hour on 8 x llama3-8b-h100), while 2 blocks give 7,373 keys, a hit
    ratio of 0.151 and a mean TTFT of 1.25 s. Set it past the longest shared system prompt.
    """

    virtual_nodes: int = 160
    prefix_blocks: int = 2

    def __post_init__(self) -> None:
        if self.virtual_nodes <= 0:
            raise ValueError("virtual_nodes must be positive")
        if self.prefix_blocks <= 0:
            raise ValueError("prefix_blocks must be positive")


@register_policy
class SessionPolicy(BasePolicy):
    """Sticky routing by consistent hashing: a session's requests find its backend's cache."""

    name: ClassVar[str] = "session"
    needs_blocks: ClassVar[bool] = True  # the fallback key when a request has no session key

    def __init__(self, rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(rng)
        self.config = build_config(SessionConfig, options, self.name)
        self._members: dict[str, None] = {}  # every backend on the ring, routable or not
        self._points: list[int] = []
        self._owners: list[str] = []
        self._dirty = False
        self._counter = 0

    def on_backend_added(self, spec: BackendSpec) -> None:
        if spec.id not in self._members:
            self._members[spec.id] = None
            self._dirty = True

    def on_backend_removed(self, backend_id: str) -> None:
        if self._members.pop(backend_id, 0) is None:
            self._dirty = True

    def _ring(self) -> tuple[list[int], list[str]]:
        if self._dirty:
            ring = sorted(
                (_h64(f"{bid}#{i}"), bid)
                for bid in self._members
                for i in range(self.config.virtual_nodes)
            )
            self._points = [point for point, _ in ring]
            self._owners = [owner for _, owner in ring]
            self._dirty = False
        return self._points, self._owners

    def owner(self, key: str, routable: Sequence[str]) -> str:
        """The first backend in `routable` clockwise from `key`'s point on the ring."""
        for bid in routable:  # a backend the core never announced still gets its points
            if bid not in self._members:
                self._members[bid] = None
                self._dirty = True
        points, owners = self._ring()
        allowed = set(routable)
        start = bisect.bisect_right(points, _h64(key))
        n = len(points)
        for step in range(n):
            bid = owners[(start + step) % n]
            if bid in allowed:
                return bid
        raise AssertionError("routable backends are always on the ring")

    def choose(self, req: RouteRequest, backends: Sequence[BackendState], now: float) -> Choice:
        ids = [b.id for b in backends]
        if req.session_key is not None:
            return Choice(backend=self.owner("s:" + req.session_key, ids), reason="session")
        if req.blocks:
            k = min(self.config.prefix_blocks, len(req.blocks))
            return Choice(backend=self.owner(f"b:{req.blocks[k - 1]}", ids), reason="prefix")
        index = self._counter % len(ids)
        self._counter += 1
        return Choice(backend=ids[index], reason="round_robin")


def _load_builtin_policies() -> None:
    """Import the modules that register the non-baseline policies, remembering failures."""
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if getattr(exc, "name", None) == module:
                continue  # that module does not exist (yet): nothing to register
            _IMPORT_ERRORS[module] = f"{type(exc).__name__}: {exc}"


_load_builtin_policies()
