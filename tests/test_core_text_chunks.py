"""Text prompts are cut into position-based chunks, so a growing prompt tokenizes only its tail."""

from __future__ import annotations

import random

from router.core.blocks import BlockHasher
from router.core.prompt import TEXT_CHUNK_CHARS, parse_chat, parse_completion, parse_generate
from router.core.tokens import load_tokenizer


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "router", "cache", "prefix", "token", "kv"]
    return "".join((" " if rng.random() < 0.9 else "\n") + rng.choice(vocab) for _ in range(n))


def test_chunks_rejoin_cut_before_whitespace_and_repeat_in_an_extension() -> None:
    text = _words(3000)
    segs = parse_completion({"prompt": text}).segments
    assert "".join(segs) == text and len(segs) > 5
    assert all(len(s) <= TEXT_CHUNK_CHARS for s in segs)
    assert all(s[0] in " \n" for s in segs[1:])
    longer = parse_generate({"text": text + _words(900, seed=1)}).segments
    assert longer[: len(segs) - 1] == segs[:-1]
    assert "".join(longer) == text + _words(900, seed=1)
    # no whitespace at all: hard cuts, still lossless
    solid = "x" * (2 * TEXT_CHUNK_CHARS + 5)
    assert parse_completion({"prompt": solid}).segments == (
        "x" * TEXT_CHUNK_CHARS,
        "x" * TEXT_CHUNK_CHARS,
        "xxxxx",
    )
    # short prompts and chat messages are untouched
    assert parse_completion({"prompt": "abc"}).segments == ("abc",)
    long_msg = [{"role": "user", "content": text}]
    assert parse_chat({"messages": long_msg}).segments == ("user\n" + text,)


def test_growing_completion_prompt_tokenizes_only_new_chunks_and_shares_hashes() -> None:
    tok = load_tokenizer()
    hasher = BlockHasher(tok, block_tokens=64)
    text = _words(2500)
    first = parse_completion({"prompt": text, "model": "m"})
    a = hasher.route_request(first, "a")
    assert hasher.segments.misses == len(first.segments) and hasher.segments.hits == 0
    grown = parse_completion({"prompt": text + _words(1200, seed=2), "model": "m"})
    b = hasher.route_request(grown, "b")
    # resumed after the first prompt's last chunk: only the chunks from there on are tokenized
    assert hasher.resumed == 1
    new_chunks = len(grown.segments) - (len(first.segments) - 1)
    assert hasher.segments.misses == len(first.segments) + new_chunks
    # equal to hashing the grown prompt from scratch, and sharing the common prefix's blocks
    fresh = BlockHasher(tok, block_tokens=64).route_request(grown, "c")
    assert b.blocks == fresh.blocks and b.prompt_tokens == fresh.prompt_tokens
    shared = sum(len(tok.encode(s)) for s in first.segments[:-1]) // 64
    assert shared > 10 and a.blocks[:shared] == b.blocks[:shared]
    # a third turn resumes from the second's state
    third = parse_completion({"prompt": text + _words(1200, seed=2) + _words(50, 3), "model": "m"})
    c = hasher.route_request(third, "d")
    assert hasher.resumed == 2 and c.blocks[: len(b.blocks) - 2] == b.blocks[: len(b.blocks) - 2]
