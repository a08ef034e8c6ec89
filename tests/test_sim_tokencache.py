"""backends/sim/tokencache.py: pieces cut at "letter, space, letter" encode exactly as the whole."""

from __future__ import annotations

import random

import pytest

from backends.sim.textgen import get_tokenizer
from backends.sim.tokencache import ChunkedEncoder

_WORDS = ["the", "cache", "prefix", "naïve", "über", "日本語", "x", "Straße", "ЖЖ", "a"]
_OTHER = [" ", "  ", "\n", "\n\n", ". ", ", ", "!? ", "123", " 4567", "'s", " 's", "\t",
          "<|endoftext|>", "—", "  \n ", "_", "₂", "Ⅻ", "x²"]  # fmt: skip


def _text(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        parts.append(rng.choice(_OTHER) if rng.random() < 0.3 else " " + rng.choice(_WORDS))
    return "".join(parts)


def test_pieces_encode_exactly_as_the_whole_text() -> None:
    tok = get_tokenizer()
    whole = tok.encode_whole  # type: ignore[attr-defined]
    rng = random.Random(7)
    enc = ChunkedEncoder(whole, chunk_chars=64)  # many cuts per text
    for _ in range(300):
        text = _text(rng, rng.randint(1, 400))
        assert enc.encode(text) == whole(text)
    assert enc.misses > 0


def test_a_shared_prefix_is_encoded_once() -> None:
    calls: list[str] = []

    def whole(text: str) -> list[int]:
        calls.append(text)
        return get_tokenizer().encode_whole(text)  # type: ignore[attr-defined,no-any-return]

    enc = ChunkedEncoder(whole, chunk_chars=100)
    first = "".join(f" w{i}x" for i in range(300))  # no two pieces alike
    enc.encode(first)
    pieces = len(enc.cuts(first)) + 1
    assert len(calls) == pieces
    calls.clear()
    second = first + " and some more text at the end"
    assert enc.encode(second) == get_tokenizer().encode_whole(second)  # type: ignore[attr-defined]
    # every piece before the first text's last cut is reused: only the text after it is new
    last_cut = enc.cuts(first)[-1]
    assert calls and all(c in second[last_cut:] for c in calls)
    assert "".join(calls) == second[last_cut:]


def test_cuts_sit_only_between_letters() -> None:
    enc = ChunkedEncoder(lambda t: [], chunk_chars=5)
    text = "abc 12 def. ghi jkl\n mno pqr"
    for i in enc.cuts(text):
        assert text[i] == " " and text[i - 1].isalpha() and text[i + 1].isalpha()
    assert enc.cuts("short") == []
    with pytest.raises(ValueError):
        ChunkedEncoder(lambda t: [], chunk_chars=0)


def test_the_cache_is_bounded_in_tokens() -> None:
    enc = ChunkedEncoder(lambda t: list(range(len(t))), chunk_chars=10, max_tokens=50)
    for i in range(20):
        enc.encode(f"aaaaaaaaaa{i} bbbbbbbbbbbb cccccccccccc")
    assert enc._tokens <= 50
