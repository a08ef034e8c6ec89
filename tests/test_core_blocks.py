"""Chained block hashes: prefix equality, partial blocks, the incremental chat path, speed."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.blocks import (
    HASH_SCHEME,
    HASH_VERSION,
    BlockHasher,
    chain_hashes,
    route_request_from_hash_ids,
    salt_seed,
)
from router.core.prompt import parse_chat, parse_generate
from router.core.tokens import load_tokenizer

token_lists = st.lists(st.integers(min_value=0, max_value=200_000), max_size=300)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@settings(max_examples=300, deadline=None)
@given(a=token_lists, b=token_lists, bt=st.integers(min_value=1, max_value=70))
def test_equal_prefix_iff_equal_hash_at_depth(a: list[int], b: list[int], bt: int) -> None:
    ha, hb = chain_hashes(a, bt), chain_hashes(b, bt)
    assert len(ha) == -(-len(a) // bt)
    for k in range(min(len(ha), len(hb))):
        same_block_k = a[: (k + 1) * bt] == b[: (k + 1) * bt]
        assert (ha[k] == hb[k]) == same_block_k
        assert 0 <= ha[k] < 2**64


@settings(max_examples=100, deadline=None)
@given(base=token_lists, tail_a=token_lists, tail_b=token_lists)
def test_shared_prefix_shares_exactly_its_whole_blocks(
    base: list[int], tail_a: list[int], tail_b: list[int]
) -> None:
    bt = 16
    a, b = base + tail_a, base + tail_b
    shared = common_prefix(a, b)
    ha, hb = chain_hashes(a, bt), chain_hashes(b, bt)
    equal = common_prefix(ha, hb)
    whole = shared // bt
    # every whole shared block matches; a partial block matches only if both end there equally
    assert equal >= whole
    assert equal <= whole + 1
    if equal == whole + 1:
        assert a[: equal * bt] == b[: equal * bt]


def test_partial_last_block_covers_its_actual_tokens() -> None:
    full = list(range(128))
    assert chain_hashes(full[:100], 64)[1] != chain_hashes(full, 64)[1]
    assert chain_hashes(full[:100], 64)[0] == chain_hashes(full, 64)[0]


def test_seed_separates_chains_and_is_stable() -> None:
    ids = list(range(64))
    assert chain_hashes(ids, 64, seed=1) != chain_hashes(ids, 64, seed=2)
    assert salt_seed("model-a") == salt_seed("model-a") != salt_seed("model-b")
    assert chain_hashes([1, 2, 3], 2, seed=7) == chain_hashes((1, 2, 3), 2, seed=7)
    # stable across processes, hosts and releases: pinned constants. If these change (a new
    # hash, or a CPython whose tuple hash differs), bump HASH_VERSION: replicas compare
    # HASH_SCHEME in their state events and refuse each other's otherwise.
    assert chain_hashes([1, 2, 3], 2, seed=7) == (6123523012757703979, 13453822380236945065)
    assert salt_seed("model-a") == 5339970062177537126
    assert chain_hashes(list(range(300)), 64, salt_seed("m"))[-1] == 17552847926589757654
    assert HASH_VERSION == 1 and HASH_SCHEME == "1-41dccae1ded668e1"
    with pytest.raises(ValueError):
        chain_hashes(ids, 0)


def test_hash_is_deterministic_across_processes() -> None:
    import subprocess
    import sys

    code = (
        "from router.core.blocks import chain_hashes, salt_seed\n"
        "print(chain_hashes(list(range(300)), 64, salt_seed('m')))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            timeout=60,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(chain_hashes(list(range(300)), 64, salt_seed("m")))


def conversation(turns: int, words: int = 60) -> list[dict[str, str]]:
    rng = random.Random(turns)
    vocab = ["alpha", "beta", "gamma", "delta", "router", "cache", "token", "prefix", "GPU"]
    msgs = [{"role": "system", "content": "You are helpful. " * 20}]
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": " ".join(rng.choice(vocab) for _ in range(words))})
    return msgs


def test_block_hasher_matches_flat_hashing_and_resumes() -> None:
    tok = load_tokenizer()
    hasher = BlockHasher(tok, block_tokens=32)
    msgs = conversation(13)  # system + 13: fourteen messages, seven turns of two
    previous: tuple[int, ...] = ()
    for n in range(2, len(msgs) + 1, 2):
        prompt = parse_chat({"model": "m", "messages": msgs[:n], "max_tokens": 9, "user": "u"})
        req = hasher.route_request(prompt, rid=f"r{n}")
        flat = [t for seg in prompt.segments for t in tok.encode(seg)]
        assert req.blocks == chain_hashes(flat, 32, hasher.text_seed("m"))
        assert req.prompt_tokens == len(flat)
        assert req.max_tokens == 9 and req.session_key == "u" and req.block_tokens == 32
        # the earlier turn's whole blocks are a prefix of this turn's
        whole = len(previous) - 1 if previous else 0
        assert req.blocks[:whole] == previous[:whole]
        previous = req.blocks
    assert hasher.resumed == len(range(2, len(msgs) + 1, 2)) - 1
    assert hasher.fresh == 1
    # each message was tokenized once
    assert hasher.segments.misses == len(msgs)
    # repeating a request resumes from its own state and gives the same blocks
    again = hasher.route_request(prompt, rid="again")
    assert again.blocks == previous


def test_block_hasher_never_resumes_from_a_lookalike_prefix() -> None:
    """States are found by message lengths and last message; a lookalike must not be used."""
    tok = load_tokenizer()
    hasher = BlockHasher(tok, block_tokens=8)
    a = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "same"}]
    b = [{"role": "user", "content": "gamma zeta"}, {"role": "assistant", "content": "same"}]
    assert [len(m["content"]) for m in a] == [len(m["content"]) for m in b]
    hasher.route_request(parse_chat({"messages": a}), "a")
    for msgs in (b, [*b, {"role": "user", "content": "next"}], a):
        prompt = parse_chat({"messages": msgs})
        req = hasher.route_request(prompt, "x")
        flat = [t for seg in prompt.segments for t in tok.encode(seg)]
        assert req.blocks == chain_hashes(flat, 8, hasher.text_seed(""))
    # b was fresh (a's state had the same key but other text), b + 1 resumed from b, and b's
    # state had replaced a's under the shared key, so a was hashed afresh again
    assert (hasher.fresh, hasher.resumed) == (3, 1)


def test_block_hasher_keeps_one_copy_of_a_conversations_earlier_messages() -> None:
    """A resumed state stores the earlier turn's strings, not this request's equal copies.

    A live request's body is decoded afresh, so every turn brings new copies of the earlier
    messages; keeping them would hold the whole conversation once per turn, and leave each
    parse to fault in new memory.
    """
    hasher = BlockHasher(load_tokenizer(), block_tokens=8)
    msgs = conversation(5)

    def fresh(n: int) -> tuple[str, ...]:  # as if the JSON body were decoded again
        prompt = parse_chat(json.loads(json.dumps({"messages": msgs[:n]})))
        hasher.route_request(prompt, f"r{n}")
        return prompt.segments

    first = fresh(2)
    fresh(4)
    third = fresh(6)
    assert hasher.resumed == 2
    (state,) = (s for s in hasher._states.values() if len(s.segments) == 6)
    assert state.segments == third
    assert all(kept is seg for kept, seg in zip(state.segments[:2], first, strict=True))
    assert all(kept is not seg for kept, seg in zip(state.segments[:4], third, strict=False))
    assert state.segments[5] is third[5]  # only the new messages are this request's own


def test_block_hasher_models_do_not_share_and_input_ids_hash_directly() -> None:
    hasher = BlockHasher(load_tokenizer(), block_tokens=4)
    msgs = [{"role": "user", "content": "the same words for both models"}]
    a = hasher.route_request(parse_chat({"model": "a", "messages": msgs}), "1")
    b = hasher.route_request(parse_chat({"model": "b", "messages": msgs}), "2")
    assert a.blocks[0] != b.blocks[0]
    ids = hasher.route_request(parse_generate({"input_ids": list(range(10))}), "3")
    assert ids.prompt_tokens == 10 and len(ids.blocks) == 3


def test_block_hasher_state_cache_is_bounded() -> None:
    hasher = BlockHasher(load_tokenizer(), block_tokens=8, state_entries=3)
    for i in range(10):
        hasher.route_request(parse_generate({"text": f"prompt number {i} " * 5}), str(i))
    assert len(hasher._states) == 3


def test_route_request_from_hash_ids() -> None:
    req = route_request_from_hash_ids("r", [0, 5, 9], 512, 1100, 20)
    assert req.blocks == (0, 5, 9) and req.prompt_tokens == 1100 and req.tokens_in_blocks(2) == 1024
    with pytest.raises(ValueError):
        route_request_from_hash_ids("r", [0], 512, 1100, None)


def test_speed_of_hashing_and_warm_chat_path() -> None:
    """8k tokens hashed, and a warm 20-message chat resolved, in a few hundred microseconds."""
    ids = [random.Random(0).randrange(100_000) for _ in range(8192)]
    best = min(_timed(lambda: chain_hashes(ids, 64)) for _ in range(30))
    print(f"chain_hashes 8192 tokens: {best * 1e6:.0f} us")
    assert best < 2e-3  # ~0.15 ms on a loaded 2-core box; generous for CI noise

    tok = load_tokenizer()
    hasher = BlockHasher(tok)
    msgs = conversation(20, words=300)
    hasher.route_request(parse_chat({"messages": msgs[:-2]}), "warm")
    prompt = parse_chat({"messages": msgs})
    n = hasher.route_request(prompt, "x").prompt_tokens
    assert n > 5000
    warm = min(_timed(lambda: hasher.route_request(prompt, "y")) for _ in range(30))
    print(f"warm chat ({n} tokens): {warm * 1e6:.0f} us")
    assert warm < 2e-3


def _timed(fn: object) -> float:
    assert callable(fn)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
