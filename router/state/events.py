"""What router replicas tell each other, and its compact wire form.

A replica shares three facts about each request it routes, nothing more::

    Routed      rid went to backend; its prompt's chained block hashes and sizes
    FirstToken  rid's prefill is done on backend (its prompt left that backend's queue)
    Ended       rid finished, failed or was aborted (one per attempt; a retry ends the first)

That is exactly what another replica's policy needs to keep the same beliefs: which backend
holds which prefix (`Routed.blocks`) and how much prefill work each backend has queued
(`Routed` adds it, `FirstToken`/`Ended` take it away). Responses, texts and timings stay local.

Wire form: one msgpack array per event, ``[version, kind, replica, rid, backend, t, ...]``,
with Routed appending ``blocks, block_tokens, prompt_tokens, max_tokens, hash_scheme``.
`hash_scheme` is the sender's `router.core.blocks.HASH_SCHEME`: block hashes from a replica
that hashes differently (another release, another CPython tuple hash) would match nothing
here and silently cost every cache hit, so `decode` raises `IncompatibleReplicaError` for them and
the reader logs it as an error. Block hashes are
64-bit ints (signed, as CPython's tuple hash gives them; unsigned is accepted too), which
msgpack writes in at most 9 bytes: an 8k-token prompt at 64 tokens/block is ~130 hashes, about
1.2 kB. `t` is the sender's wall clock (seconds since the epoch): informational, used for the
receiver's lag estimate only, never as the receiver's `now` (clocks of two hosts disagree).

`decode` raises `EventError` for anything it cannot turn into a valid event (unknown version
or kind, wrong types, invalid sizes), so a reader can skip a bad entry and go on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from router.core.blocks import HASH_SCHEME
from router.core.model import RouteRequest

__all__ = [
    "WIRE_VERSION",
    "Ended",
    "Event",
    "EventError",
    "FirstToken",
    "IncompatibleReplicaError",
    "Routed",
    "decode",
    "encode",
    "remote_rid",
    "valid_name",
]

WIRE_VERSION: Final = 2  # 2: Routed carries the hash scheme
_ROUTED, _FIRST_TOKEN, _ENDED = 1, 2, 3
_MIN_HASH: Final = -(1 << 63)
_MAX_HASH: Final = (1 << 64) - 1
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class EventError(ValueError):
    """Bytes or fields that do not make a valid event."""


class IncompatibleReplicaError(EventError):
    """An event from a replica of another wire version or hash scheme: never applicable."""


def valid_name(name: str, what: str) -> str:
    """A replica id or cluster name: 1-64 of [A-Za-z0-9_.:-], safe in Redis keys and rids."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise EventError(f"{what} must be 1-64 characters of [A-Za-z0-9_.:-], got {name!r}")
    return name


def remote_rid(replica: str, rid: str) -> str:
    """The id a remote request has in this replica's policy: unique across replicas."""
    return f"{replica}/{rid}"


def _check_common(replica: str, rid: str, backend: str, t: float) -> None:
    valid_name(replica, "replica")
    if not isinstance(rid, str) or not rid:
        raise EventError("rid must be a non-empty string")
    if not isinstance(backend, str) or not backend:
        raise EventError("backend must be a non-empty string")
    if not isinstance(t, float | int) or isinstance(t, bool) or t != t:
        raise EventError("t must be a number")


@dataclass(frozen=True, slots=True, kw_only=True)
class Routed:
    """Replica `replica` sent request `rid` (prompt as block hashes) to `backend`."""

    replica: str
    rid: str
    backend: str
    blocks: tuple[int, ...]
    block_tokens: int
    prompt_tokens: int
    max_tokens: int | None = None
    t: float

    def __post_init__(self) -> None:
        _check_common(self.replica, self.rid, self.backend, self.t)
        for h in self.blocks:
            if not isinstance(h, int) or isinstance(h, bool) or not _MIN_HASH <= h <= _MAX_HASH:
                raise EventError(f"block hash {h!r} is not a 64-bit int")
        try:
            self.request()
        except ValueError as err:
            raise EventError(str(err)) from None

    def request(self) -> RouteRequest:
        """The request as this replica's policy sees it, under its cross-replica rid."""
        return RouteRequest(
            rid=remote_rid(self.replica, self.rid),
            blocks=self.blocks,
            block_tokens=self.block_tokens,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.max_tokens,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Milestone:
    """What FirstToken and Ended carry: a request of a replica reached a point on a backend."""

    replica: str
    rid: str
    backend: str
    t: float

    def __post_init__(self) -> None:
        _check_common(self.replica, self.rid, self.backend, self.t)


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstToken(_Milestone):
    """Request `rid` of `replica` got its first token from `backend`: its prefill is done."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ended(_Milestone):
    """Request `rid` of `replica` on `backend` ended (finished, failed or aborted)."""


Event = Routed | FirstToken | Ended


def encode(event: Event) -> bytes:
    """One event as a msgpack array (module docstring)."""
    head: list[Any] = [event.replica, event.rid, event.backend, float(event.t)]
    if isinstance(event, Routed):
        body = [
            WIRE_VERSION,
            _ROUTED,
            *head,
            list(event.blocks),
            event.block_tokens,
            event.prompt_tokens,
            event.max_tokens,
            HASH_SCHEME,
        ]
    elif isinstance(event, FirstToken):
        body = [WIRE_VERSION, _FIRST_TOKEN, *head]
    else:
        body = [WIRE_VERSION, _ENDED, *head]
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise EventError(f"{what} must be an int")
    return value


def decode(data: bytes) -> Event:
    """The event in `data`; EventError if it is not one this version understands."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise EventError(f"not msgpack: {err}") from None
    if not isinstance(body, list) or len(body) < 6:
        raise EventError("an event is a msgpack array of at least 6 items")
    version, kind, replica, rid, backend, t = body[:6]
    if version != WIRE_VERSION:
        raise IncompatibleReplicaError(
            f"replica {replica!r} speaks event version {version!r}, this one {WIRE_VERSION} "
            "(run one release per cluster)"
        )
    if kind == _ROUTED:
        if len(body) != 11:
            raise EventError("a Routed event has 11 items")
        blocks, block_tokens, prompt_tokens, max_tokens, scheme = body[6:]
        if scheme != HASH_SCHEME:
            raise IncompatibleReplicaError(
                f"replica {replica!r} hashes prompts under scheme {scheme!r}, this one under "
                f"{HASH_SCHEME!r}: its prefixes cannot match ours (run one release and one "
                "Python version per cluster)"
            )
        if not isinstance(blocks, list):
            raise EventError("blocks must be an array")
        return Routed(
            replica=replica,
            rid=rid,
            backend=backend,
            blocks=tuple(blocks),
            block_tokens=_int(block_tokens, "block_tokens"),
            prompt_tokens=_int(prompt_tokens, "prompt_tokens"),
            max_tokens=None if max_tokens is None else _int(max_tokens, "max_tokens"),
            t=t,
        )
    if len(body) != 6:
        raise EventError("FirstToken and Ended events have 6 items")
    if kind == _FIRST_TOKEN:
        return FirstToken(replica=replica, rid=rid, backend=backend, t=t)
    if kind == _ENDED:
        return Ended(replica=replica, rid=rid, backend=backend, t=t)
    raise EventError(f"unknown event kind {kind!r}")
