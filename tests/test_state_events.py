"""Replica events: validation when built, msgpack round trip, and rejection of bad bytes."""

from __future__ import annotations

import random

import msgpack
import pytest

from router.core.blocks import HASH_SCHEME
from router.state import open_state
from router.state.events import (
    WIRE_VERSION,
    Ended,
    Event,
    EventError,
    FirstToken,
    IncompatibleReplicaError,
    Routed,
    decode,
    encode,
    remote_rid,
)
from router.state.memory import LocalState


def _routed(**overrides: object) -> Routed:
    rng = random.Random(7)
    fields: dict[str, object] = {
        "replica": "r1",
        "rid": "req-1",
        "backend": "http://10.0.0.1:30000",
        "blocks": tuple(rng.getrandbits(64) - (1 << 63) for _ in range(130)),
        "block_tokens": 64,
        "prompt_tokens": 130 * 64 - 10,
        "max_tokens": 256,
        "t": 1_700_000_000.25,
    }
    fields.update(overrides)
    return Routed(**fields)  # type: ignore[arg-type]


def test_round_trip_of_every_kind() -> None:
    events: list[Event] = [
        _routed(),
        _routed(max_tokens=None, blocks=(0, (1 << 64) - 1, -(1 << 63)), prompt_tokens=150),
        FirstToken(replica="r1", rid="req-1", backend="a", t=1.5),
        Ended(replica="r-2.x:y", rid="some/rid with spaces", backend="b", t=2),
    ]
    for event in events:
        assert decode(encode(event)) == event


def test_long_prompt_is_compact() -> None:
    data = encode(_routed())
    # 130 hashes of at most 9 bytes each, plus a few dozen bytes of header.
    assert len(data) <= 130 * 9 + 80


def test_request_carries_the_cross_replica_rid() -> None:
    req = _routed().request()
    assert req.rid == remote_rid("r1", "req-1") == "r1/req-1"
    assert req.prompt_tokens == 130 * 64 - 10
    assert len(req.blocks) == 130 and req.max_tokens == 256


@pytest.mark.parametrize(
    "overrides",
    [
        {"replica": ""},
        {"replica": "has/slash"},
        {"rid": ""},
        {"backend": ""},
        {"block_tokens": 0},
        {"prompt_tokens": 130 * 64 + 1},  # more than the blocks can hold
        {"blocks": (1 << 64,)},
        {"blocks": (True,)},
        {"max_tokens": -1},
        {"t": float("nan")},
    ],
)
def test_invalid_events_cannot_be_built(overrides: dict[str, object]) -> None:
    with pytest.raises(EventError):
        _routed(**overrides)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb({"a": 1}),
        msgpack.packb([WIRE_VERSION + 1, 2, "r", "x", "b", 1.0]),
        msgpack.packb([WIRE_VERSION, 9, "r", "x", "b", 1.0]),
        msgpack.packb([WIRE_VERSION, 2, "r", "x", "b", 1.0, "extra"]),
        msgpack.packb([WIRE_VERSION, 1, "r", "x", "b", 1.0, [1, 2], 64, 100]),
        msgpack.packb([WIRE_VERSION, 1, "r", "x", "b", 1.0, [1, "x"], 64, 100, None, HASH_SCHEME]),
        msgpack.packb([WIRE_VERSION, 1, "r", "x", "b", 1.0, [1], 64, 65, None, HASH_SCHEME]),
        msgpack.packb([WIRE_VERSION, 3, 5, "x", "b", 1.0]),
    ],
)
def test_bad_bytes_raise_event_error(data: bytes) -> None:
    with pytest.raises(EventError):
        decode(data)


def test_a_replica_hashing_differently_is_refused_not_skipped() -> None:
    good = msgpack.unpackb(encode(_routed()))
    assert good[0] == WIRE_VERSION == 2 and good[-1] == HASH_SCHEME
    assert decode(msgpack.packb(good)) == _routed()
    other_scheme = [*good[:-1], "1-0000000000000000"]
    with pytest.raises(IncompatibleReplicaError, match="scheme"):
        decode(msgpack.packb(other_scheme))
    older_release = [1, *good[1:-1]]  # version 1: no hash scheme on the wire
    with pytest.raises(IncompatibleReplicaError, match="version 1"):
        decode(msgpack.packb(older_release))


def test_open_state_picks_the_transport() -> None:
    assert isinstance(open_state(None), LocalState)
    local = open_state("memory", cluster="c1", replica="me")
    assert (local.replica, local.cluster, local.remote) == ("me", "c1", False)
    redis_state = open_state("redis://127.0.0.1:1/0", cluster="prod")
    assert redis_state.remote and redis_state.cluster == "prod"
    assert len(redis_state.replica) == 12  # random per process unless configured
    with pytest.raises(ValueError, match="--state"):
        open_state("http://nope")
    with pytest.raises(ValueError, match="cluster"):
        open_state("memory", cluster="bad cluster*")
