"""Offline tokenizer loading and the per-segment token cache."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

from router.core.tokens import (
    HFTokenizer,
    SegmentTokenCache,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
)


class CountingTokenizer:
    """One id per character; counts how often it is asked."""

    name = "chars"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_default_tokenizer_loads_offline_and_round_trips() -> None:
    tok = load_tokenizer()
    assert isinstance(tok, TiktokenTokenizer)
    assert isinstance(tok, Tokenizer)
    assert tok.name == "cl100k_base"
    ids = tok.encode("hello world")
    assert ids == [15339, 1917]
    assert tok.decode(ids) == "hello world"


def test_special_token_text_is_plain_text() -> None:
    tok = load_tokenizer("cl100k_base")
    ids = tok.encode("x <|endoftext|> y")
    assert 100257 not in ids  # the real special token's id
    assert tok.decode(ids) == "x <|endoftext|> y"


def test_tokenizer_loads_with_network_disabled(tmp_path: os.PathLike[str]) -> None:
    """A fresh process with every socket refused and an empty tiktoken cache still loads it."""
    code = (
        "import socket\n"
        "def no(*a, **k): raise OSError('network disabled in test')\n"
        "socket.socket.connect = no\n"
        "socket.create_connection = no\n"
        "socket.getaddrinfo = no\n"
        "from router.core.tokens import load_tokenizer\n"
        "print(load_tokenizer().encode('hello world'))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[15339, 1917]"


def test_unknown_tiktoken_name_is_refused_rather_than_downloaded() -> None:
    with pytest.raises(ValueError, match="no offline copy"):
        load_tokenizer("o200k_base")


def test_tokenizer_json_path_goes_to_hf(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(str(tmp_path), "tokenizer.json")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="optional 'tokenizers' package"):
            load_tokenizer(missing)
    else:
        with pytest.raises(FileNotFoundError):
            HFTokenizer(missing)


def test_segment_cache_counts_hits_and_tokenizes_once() -> None:
    tok = CountingTokenizer()
    cache = SegmentTokenCache(tok, max_entries=8)
    turns = [f"message {i}" for i in range(5)]
    for n in range(1, len(turns) + 1):  # a conversation growing by one message per turn
        for seg in turns[:n]:
            assert cache.encode(seg) == tuple(ord(c) for c in seg)
    assert tok.calls == 5
    assert cache.misses == 5
    assert cache.hits == 1 + 2 + 3 + 4
    assert len(cache) == 5


def test_segment_cache_is_bounded_in_entries_and_tokens() -> None:
    tok = CountingTokenizer()
    cache = SegmentTokenCache(tok, max_entries=3, max_tokens=10)
    for s in ("aaaa", "bbbb", "cccc"):  # 12 tokens > 10: the oldest goes
        cache.encode(s)
    assert len(cache) == 2 and cache.cached_tokens == 8
    cache.encode("bbbb")  # a hit makes b the most recently used
    cache.encode("dd")
    assert cache.cached_tokens <= 10 and len(cache) <= 3
    calls = tok.calls
    cache.encode("bbbb")
    assert tok.calls == calls  # b survived as recently used
    cache.encode("x" * 50)  # larger than the whole cache: returned, not cached
    assert cache.cached_tokens <= 10
    with pytest.raises(ValueError):
        SegmentTokenCache(tok, max_entries=0)
